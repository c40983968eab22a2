"""Array checksums (gptj.core.integrity): independent of the layout, sensitive to any change; storage error lines."""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptj.core import integrity, storage
from gptj.errors import IntegrityError


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


LAYOUTS = [P(), P("data", "model"), P("model", "data"), P(None, "model"), P(("data", "model"), None)]


def _device_program_digest(x: jax.Array) -> list[str]:
    """`x`'s digest as an accelerator computes it: the device program on each distinct shard (a CPU device's
    shards are hashed with numpy instead, which array_digests does here)."""
    strides = integrity._strides(x.shape, x.dtype)
    return integrity.finish_digests([[integrity._device_hash(shard.data, integrity._shard_offsets(shard.index), strides)
                                      for shard in x.addressable_shards if shard.replica_id == 0]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool", "int4", "uint32"])
def test_digest_is_the_same_on_every_layout(mesh, dtype):
    """Whole on the host, on one device or split over the mesh, hashed by numpy or by the device program."""
    values = np.random.default_rng(0).normal(size=(8, 16)) * 50
    x = jnp.asarray(values).astype(dtype)
    expected = integrity.array_digests(np.asarray(x))
    assert integrity.array_digests(jax.device_put(x, jax.devices()[5])) == expected
    for spec in LAYOUTS:
        placed = jax.device_put(x, NamedSharding(mesh, spec))
        assert integrity.array_digests(placed) == _device_program_digest(placed) == expected, spec


def test_digest_changes_with_any_damage(mesh):
    x = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32)
    (base,) = integrity.array_digests(jax.device_put(x, NamedSharding(mesh, P("data", "model"))))
    flipped = x.copy()
    flipped.view(np.uint32)[17, 3] ^= 1 << 9  # one bit
    swapped = x.copy()
    swapped[[2, 40]] = swapped[[40, 2]]  # the same values in other places
    zeroed = x.copy()
    zeroed.reshape(-1)[700:1724] = 0  # 4 KiB of zeros
    for damaged in (flipped, swapped, zeroed, x.T.copy().reshape(x.shape)):
        assert integrity.array_digests(damaged) != [base]


def test_manifest_checks_itself():
    manifest = integrity.build_manifest({"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}},
                                        {"data": {"index": 3}})
    entries = integrity.check_manifest(manifest)
    assert entries["params"]["params/w"]["shape"] == [2, 3] and entries["data"] == {"json": integrity.json_digest(
        {"index": 3})}
    tampered = dict(manifest, items=dict(manifest["items"], data={"json": "00000000"}))
    with pytest.raises(IntegrityError, match="checksum manifest: damaged"):
        integrity.check_manifest(tampered)
    with pytest.raises(IntegrityError, match="not a gptj-integrity/1 manifest"):
        integrity.check_manifest({"items": {}})


@pytest.mark.parametrize("error, fault", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/_sharding": Failed writing'), "no space left"),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (ValueError("OUT_OF_RANGE: Error reading"), None),
])
def test_storage_faults_are_recognised_through_the_cause_chain(error, fault):
    try:
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("Save Finalize thread failed") from cause
    except RuntimeError as wrapped:
        assert storage.storage_fault(wrapped) == fault


def test_reason_is_one_short_line_without_the_tensorstore_dump():
    dump = ("Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore details: "
            "<bound method spec of TensorStore({\n  'base': {\n    'driver': 'zarr',\n" + "  x\n" * 200 + "})>.")
    cause = ValueError('OUT_OF_RANGE: Error reading "wte/0.0" in OCDBT database: Requested byte range is not valid')
    try:
        try:
            raise cause
        except ValueError as e:
            raise ValueError(dump) from e
    except ValueError as e:
        line = storage.reason(e)
    assert line == str(cause)
    assert "\n" not in storage.reason(ValueError(dump)) and len(storage.reason(ValueError("x" * 1000))) == 300
