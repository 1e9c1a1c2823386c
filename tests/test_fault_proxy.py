"""s3fs through a fault-injecting proxy (tests/fault_proxy.py) in front of moto: with
RETRY_OPTIONS, 503s, SlowDowns, 500s, connection resets and slow answers are all retried and the
data comes back byte for byte; a dead endpoint fails in bounded time with a known error."""
import http.client
import json
import os
import random
import threading
import time
import urllib.request
import uuid

import botocore.exceptions
import pytest
import s3fs

from tests.conftest import free_port
from mera_ds.storage import S3_CONFIG
from tests.fault_proxy import DEFAULT_KINDS, FaultProxy

MiB = 2**20

# What mera's storage gives every s3:// URL (mera_ds.storage.S3_CONFIG). botocore does most
# retrying: "standard" mode retries 500/502/503/504, throttling codes (SlowDown), connection
# errors (a reset surfaces as EndpointConnectionError, which s3fs's own loop does not retry) and
# timeouts, with jittered exponential backoff, and a per-client retry quota that stops retrying
# during a long outage. s3fs's loop (S3FileSystem.retries = 5, not a storage option) retries,
# around all of botocore's attempts, read timeouts, dropped connections, SlowDown and bodies cut
# off mid-read (ClientPayloadError, after botocore has returned).
RETRY_OPTIONS = {"config_kwargs": S3_CONFIG}


@pytest.fixture(autouse=True)
def seeded_backoff():
    """botocore's backoff jitter draws from the global `random`: seeded, a test's time repeats."""
    state = random.getstate()
    random.seed(1)
    yield
    random.setstate(state)


def make_fs(url, options=RETRY_OPTIONS, **kw):
    # skip_instance_cache: each test gets its own client (its own retry quota and pool).
    return s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True, **options, **kw)


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket, made and removed directly on moto (never through a proxy)."""
    fs = make_fs(s3_endpoint)
    name = f"fault-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    yield name
    fs.rm(name, recursive=True)


def first_n(n, predicate):
    """An `only` filter: the first n requests that match predicate(method, path, headers)."""
    seen, lock = [0], threading.Lock()

    def only(method, path, headers):
        if not predicate(method, path, headers):
            return False
        with lock:
            seen[0] += 1
            return seen[0] <= n
    return only


def test_binds_loopback_and_forwards_bodies_verbatim(s3_endpoint, bucket):
    with FaultProxy(s3_endpoint, rate=0.0, seed=0) as proxy:
        assert proxy._server.server_address[0] == "127.0.0.1"
        assert proxy.url.startswith("http://127.0.0.1:")
        host, port = proxy.url[len("http://"):].split(":")
        body = os.urandom(300_000)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        # A chunked upload (re-framed with Content-Length upstream), then a plain one, then a
        # query string, all on one kept-alive connection; then a (signed) HEAD.
        conn.request("PUT", f"/{bucket}/chunked", body=iter([body[:1000], body[1000:]]),
                     encode_chunked=True)
        assert conn.getresponse().read() == b""
        conn.request("PUT", f"/{bucket}/plain", body=body[:5])
        conn.getresponse().read()
        conn.request("GET", f"/{bucket}?list-type=2&prefix=ch")
        listing = conn.getresponse().read()
        assert b"<Key>chunked</Key>" in listing and b"<Key>plain</Key>" not in listing
        conn.close()
        assert make_fs(proxy.url).info(f"{bucket}/chunked")["size"] == len(body)
        assert make_fs(s3_endpoint).cat(f"{bucket}/chunked") == body
        assert proxy.requests == 4 and sum(proxy.faults.values()) == 0
    with pytest.raises(ValueError):
        FaultProxy("https://example.com", rate=0.1, seed=0)


def test_same_seed_same_faults(s3_endpoint, bucket):
    """Faults depend only on the seed and the order of requests."""
    def run(seed):
        with FaultProxy(s3_endpoint, rate=0.5, seed=seed, kinds=("503", "500")) as proxy:
            host, port = proxy.url[len("http://"):].split(":")
            for i in range(30):
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("GET", f"/{bucket}?list-type=2&i={i}")
                conn.getresponse().read()
                conn.close()
            return [kind for _, _, kind in proxy.log]
    a, b, c = run(7), run(7), run(8)
    assert a == b != c and 0 < a.count("503") and 0 < a.count("500")


def test_round_trip_through_fault_storm(s3_endpoint, bucket):
    """Puts (one-shot and multipart), listings, infos and whole and ranged reads through a proxy
    faulting 30% of requests with every default kind: every byte comes back."""
    rnd = random.Random(0)
    objects = {f"{bucket}/small-{i}": rnd.randbytes(n) for i, n in
               enumerate([10, 100_000, MiB + 3])}
    big = rnd.randbytes(12 * MiB + 7)  # 3 parts at 5 MiB
    with FaultProxy(s3_endpoint, rate=0.3, seed=162, slow_s=0.2) as proxy:
        fs = make_fs(proxy.url)
        for path, data in objects.items():
            fs.pipe_file(path, data)
        with fs.open(f"{bucket}/big", "wb", block_size=5 * MiB) as f:
            for i in range(0, len(big), 5 * MiB):  # a part per 5 MiB written
                f.write(big[i:i + 5 * MiB])
        assert sorted(fs.ls(bucket, refresh=True)) == sorted([*objects, f"{bucket}/big"])
        fs.invalidate_cache()  # HEADs below, not answers from the listing
        assert fs.info(f"{bucket}/big")["size"] == len(big)
        assert fs.exists(f"{bucket}/small-0") and not fs.exists(f"{bucket}/none")
        for path, data in objects.items():
            assert fs.cat(path) == data
        # Ranged GETs from AbstractBufferedFile: 1 MiB blocks, no read-ahead cache.
        with fs.open(f"{bucket}/big", "rb", block_size=MiB, cache_type="none") as f:
            pieces = []
            for start, n in [(0, 10), (3 * MiB - 5, 2 * MiB), (12 * MiB, MiB)]:
                f.seek(start)
                pieces.append((start, f.read(n)))
        for start, piece in pieces:
            assert piece == big[start:start + len(piece)] and piece
        faults, hit = dict(proxy.faults), [(m, p) for m, p, kind in proxy.log if kind]
    assert make_fs(s3_endpoint).cat(f"{bucket}/big") == big  # what landed, read directly
    assert all(faults[k] > 0 for k in DEFAULT_KINDS), faults
    # With this seed, faults hit a multipart part, HEADs (info/exists) and a ranged GET.
    assert any(m == "PUT" and "partNumber=" in p for m, p in hit), hit
    assert any(m == "HEAD" for m, p in hit) and (("GET", f"/{bucket}/big") in hit), hit


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_ranged_reads_reset_are_retried(s3_endpoint, bucket, kind):
    """Reads of a file opened for reading (AbstractBufferedFile: ranged GETs), 2 in a row reset:
    before the answer (botocore retries: EndpointConnectionError), or mid-body after half the
    bytes (botocore has returned by then; s3fs's loop retries the ClientPayloadError)."""
    data = os.urandom(3 * MiB)
    make_fs(s3_endpoint).pipe_file(f"{bucket}/obj", data)
    ranged = first_n(2, lambda m, p, h: m == "GET" and "Range" in h)
    with FaultProxy(s3_endpoint, rate=1.0, seed=0, kinds=(kind,), only=ranged) as proxy:
        with make_fs(proxy.url).open(f"{bucket}/obj", "rb", block_size=MiB,
                                     cache_type="none") as f:
            f.seek(MiB + 1)
            assert f.read(MiB) == data[MiB + 1:2 * MiB + 1]
        assert proxy.faults[kind] == 2


def test_slow_answers_past_read_timeout_are_retried(s3_endpoint, bucket):
    make_fs(s3_endpoint).pipe_file(f"{bucket}/obj", b"x" * 1000)
    opts = {"config_kwargs": {**RETRY_OPTIONS["config_kwargs"], "read_timeout": 0.3}}
    slowed = set()  # the first PUT and the first GET: one retry each, so one backoff (<= 1 s)

    def only(method, path, headers):
        first = method in ("PUT", "GET") and method not in slowed
        slowed.add(method)
        return first
    with FaultProxy(s3_endpoint, rate=1.0, seed=0, kinds=("slow",), slow_s=1.0,
                    only=only) as proxy:
        fs = make_fs(proxy.url, opts)
        fs.pipe_file(f"{bucket}/obj2", b"y" * 1000)
        assert fs.cat(f"{bucket}/obj") == b"x" * 1000
        assert fs.cat(f"{bucket}/obj2") == b"y" * 1000
        assert proxy.faults["slow"] == 2


def test_dead_endpoint_fails_fast_with_botocore_error(s3_endpoint):
    """Nothing listening: botocore's EndpointConnectionError (not an OSError, so
    `except OSError` misses it), after its attempts only; s3fs does not retry it."""
    opts = {"config_kwargs": {**RETRY_OPTIONS["config_kwargs"],
                              "retries": {"mode": "standard", "total_max_attempts": 2}}}
    url = f"http://127.0.0.1:{free_port()}"
    t = time.monotonic()
    with pytest.raises(botocore.exceptions.EndpointConnectionError,
                       match="Could not connect to the endpoint URL") as info:
        make_fs(url, opts).info("bucket/key")
    assert not isinstance(info.value, OSError)
    assert time.monotonic() - t < 5  # one backoff of at most 1 s


def test_hung_endpoint_attempts_multiply(s3_endpoint, bucket):
    """A server that accepts but never answers: each of s3fs's `retries` runs all of botocore's
    attempts, each waiting read_timeout (5 x 6 x 20 s with RETRY_OPTIONS; a read of a file
    opened with fs.open nests s3fs's loop twice: 5 x 5 x 6 x 20 s)."""
    make_fs(s3_endpoint).pipe_file(f"{bucket}/obj", b"x")
    opts = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2},
                              "read_timeout": 0.1}}
    with FaultProxy(s3_endpoint, rate=1.0, seed=0, kinds=("slow",), slow_s=2) as proxy:
        fs = make_fs(proxy.url, opts)
        fs.retries = 2  # only as an attribute: S3FileSystem(retries=2) fails at first call
        with pytest.raises(botocore.exceptions.ReadTimeoutError, match="Read timeout"):
            fs.info(f"{bucket}/obj")
        assert proxy.requests == 2 * 2


def _moto_auth(endpoint, count):
    """moto checks credentials after `count` more requests ("inf": never, its default).
    Process-wide: the in-process server of every test sees it."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=str(count).encode(),
                                 method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


def test_credential_errors_are_permission_errors_and_not_retried(s3_endpoint, bucket):
    import boto3

    fs = make_fs(s3_endpoint)
    fs.pipe_file(f"{bucket}/obj", b"abc")
    other = f"fault-other-{uuid.uuid4().hex[:8]}"
    fs.mkdir(other)
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="one-bucket", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
            f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    good = dict(key=key["AccessKeyId"], secret=key["SecretAccessKey"])
    previous = _moto_auth(s3_endpoint, 0)
    try:
        with FaultProxy(s3_endpoint, rate=0.0, seed=0) as proxy:
            # Through the proxy: SigV4 signs the Host header, which the proxy passes unchanged.
            assert make_fs(proxy.url, **good).cat(f"{bucket}/obj") == b"abc"
            cases = [
                (dict(key="AKIANOSUCHKEY", secret="x"), bucket, "does not exist in our records"),
                (dict(good, secret="wrong"), bucket, "signature we calculated does not match"),
                (good, other, "Access Denied"),
            ]
            for creds, target, message in cases:
                bad = make_fs(proxy.url, **creds)
                before = proxy.requests
                with pytest.raises(PermissionError, match=message):
                    bad.ls(target)
                with pytest.raises(PermissionError, match=message):
                    bad.pipe_file(f"{target}/new", b"x")
                # HEAD answers carry no body: only the status survives ("Forbidden").
                with pytest.raises(PermissionError, match="Forbidden"):
                    bad.info(f"{target}/obj")
                with pytest.raises(PermissionError):
                    bad.exists(f"{target}/obj")  # not False
                assert proxy.requests - before == 4  # one request each: never retried
    finally:
        _moto_auth(s3_endpoint, previous)
        fs.rm(other, recursive=True)
    with pytest.raises(FileNotFoundError, match="The specified bucket does not exist"):
        fs.ls(f"no-such-{uuid.uuid4().hex[:8]}")
