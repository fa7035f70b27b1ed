"""Unreadable checkpoints: the message quotes the error underneath orbax's, on one line."""

import jax.numpy as jnp
import pytest

from alignmix_jax.runtime import checkpointing


def test_underlying_reason_is_the_innermost_error_first_line():
    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "params.kernel/0.0"\nmore detail')
        except ValueError as cause:
            raise Exception('Encountered error while reading array index: (slice(0, 3, 1),). '
                            'See full TensorStore details: <bound method pybind11_detail.spec '
                            'of TensorStore({\n  ...') from cause
    except Exception as error:
        assert checkpointing.underlying_reason(error) == \
            'ValueError: OUT_OF_RANGE: Error reading "params.kernel/0.0"'
        assert checkpointing.underlying_reason(error, max_length=30) == \
            'ValueError: OUT_OF_RANGE: Error reading...'
    assert checkpointing.underlying_reason(KeyError()) == 'KeyError'


def test_a_damaged_array_file_is_reported_cleanly(tmp_path):
    state = {'kernel': jnp.arange(4096, dtype=jnp.float32).reshape(64, 64),
             'bias': jnp.ones(512, jnp.float32)}
    manager = checkpointing.make_manager(str(tmp_path))
    checkpointing.save(manager, 7, state, {'best_test_accuracy': None})
    manager.wait_until_finished()
    manager.close()
    # The arrays' data files (not the metadata): orbax then fails inside TensorStore.
    damaged = sorted((tmp_path / 'checkpoints' / '7' / 'state' / 'ocdbt.process_0').rglob('*'))
    damaged = [path for path in damaged if path.is_file()]
    assert damaged
    for path in damaged:
        path.write_bytes(b'not a checkpoint')
    manager = checkpointing.make_manager(str(tmp_path))
    with pytest.raises(checkpointing.CheckpointError) as raised:
        checkpointing.restore_latest(manager, state)
    message = str(raised.value)
    assert message.startswith(f'the checkpoint of step 7 in {tmp_path}/checkpoints is '
                              'unreadable (ValueError: ')
    assert 'Error reading "' in message and f'at local file "{tmp_path}' in message
    assert 'bound method' not in message and 'pybind11' not in message
    assert '\n' not in message
    assert message.endswith('; or it was written with a different model config); it is left '
                            'untouched: move it away to resume from an earlier checkpoint, or '
                            'start a new run with another --workdir')
