"""Per-modality connectors: encoder features -> LLM input embeddings (LLaVA's projectors), and
their checkpoints: one safetensors file per modality, local or s3://."""
from __future__ import annotations

from torch import nn

from mera_ds.errors import MeraError
from mera_ds.storage import open_url, write_bytes


def build_connector(kind: str, in_dim: int, hidden_size: int) -> nn.Module:
    """`linear`, or `mlp2x_gelu` (Linear, GELU, Linear) as in LLaVA-1.5."""
    if kind == "linear":
        return nn.Linear(in_dim, hidden_size)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, hidden_size), nn.GELU(),
                             nn.Linear(hidden_size, hidden_size))
    raise MeraError(f"connector type {kind!r} is not one of linear, mlp2x_gelu")


def save_connector(module: nn.Module, url: str) -> None:
    """Write the connector's tensors (on CPU, contiguous) as one safetensors file.

    Under ZeRO-3 the caller gathers the parameters first (deepspeed.zero.GatheredParameters)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    write_bytes(url, save(tensors, metadata={"format": "pt"}))


def load_connector(module: nn.Module, url: str) -> None:
    """Copy the tensors of a connector file into `module`; every tensor must be there with the
    same shape, and nothing else."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with open_url(url, "rb") as f:
            tensors = load(f.read())
    except FileNotFoundError:
        raise MeraError(f"{url}: no such connector file") from None
    except SafetensorError as e:
        raise MeraError(f"{url}: not a safetensors file ({e})") from None
    state = module.state_dict()
    for name, want in state.items():
        if name not in tensors:
            raise MeraError(f"{url}: tensor {name!r} is missing")
        got = tensors[name]
        if got.shape != want.shape:
            raise MeraError(f"{url}: tensor {name!r} has shape {tuple(got.shape)}, the connector "
                            f"needs {tuple(want.shape)}")
    extra = sorted(set(tensors) - set(state))
    if extra:
        raise MeraError(f"{url}: unexpected tensor {extra[0]!r} (not in this connector)")
    module.load_state_dict(tensors)
