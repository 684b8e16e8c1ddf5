"""Every ```python block of README.md runs, so a snippet cannot crash again.

Each block runs on its own (a fresh namespace) in a temporary working directory, after a small prelude that
defines what the snippets assume, at small sizes:

- ``torch``, ``fastcodec``;
- ``audiocraft_rvq``: audiocraft's ``ResidualVectorQuantizer(dimension=128, n_q=32, bins=1024)``, codebooks drawn;
- ``z``: latents (2, 128, 12); ``wav``: 24 kHz mono audio (1, 1, 2400); ``wav32``: 32 kHz audio (1, 1, 1280);
  ``chunk``: one 320-sample chunk (1, 1, 320); ``mu`` / ``sigma``: per-channel (128,) mean and std;
- ``encodec_24khz-d7cc33bc.th`` in the working directory: a random-weight 24 kHz state_dict;
- ``encodec_32khz/`` and ``encodec_48khz/`` in the working directory: Hugging Face folders (``save_pretrained``)
  of toy-sized transformers models with the published models' distinguishing settings; ``input_values`` /
  ``padding_mask``: a padded stereo batch for the 48 kHz one;
- ``audiocraft_model``: a tiny audiocraft ``EncodecModel``; ``musicgen``: an object holding one as
  ``.compression_model`` (what MusicGen holds); ``hf_model``: a tiny transformers ``EncodecModel``.

A block that cannot run offline (a download, a GPU) opts out with a ``<!-- skip-test -->`` line just before
its opening fence (blank lines between are allowed); ``test_skipped_blocks_are_listed`` names them.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "<!-- skip-test -->"

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, code, skipped) of every ```python fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*(python|py)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group(1), m.group(2)
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        skipped = j >= 0 and lines[j].strip() == SKIP_MARK
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start}: the ```python block is never closed")
        blocks.append((start + 1, "\n".join(body) + "\n", skipped))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def _audiocraft_rvq():
    from tests.conftest import import_oracle

    Q = import_oracle("audiocraft.quantization.vq")
    rvq = Q.ResidualVectorQuantizer(dimension=128, n_q=32, bins=1024)
    with torch.no_grad():
        for layer in rvq.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1)
    return rvq.eval()


def _checkpoint_24khz(directory: Path) -> None:
    from fastcodec.reference.model import EncodecModel

    torch.save(EncodecModel.encodec_model_24khz().state_dict(), directory / "encodec_24khz-d7cc33bc.th")


def _hf_folder(name: str, directory: Path) -> None:
    """A toy transformers model saved as ``directory/name`` (the test_hf_compat configurations; the 48 kHz one
    with 1024-entry codebooks and the published bandwidths, so that ``bandwidth=6.0`` is valid)."""
    import transformers

    from tests.test_hf_compat import _BASE, CONFIGS

    extra = dict(codebook_size=1024, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0]) if name == "48khz" else {}
    hf = transformers.EncodecModel(transformers.EncodecConfig(**{**_BASE, **CONFIGS[name], **extra})).eval()
    with torch.no_grad():  # trained-like codebooks (transformers initialises them to zeros)
        for layer in hf.quantizer.layers:
            layer.codebook.embed.normal_()
    hf.save_pretrained(directory / f"encodec_{name}")


def _prelude(code: str, tmp_path: Path) -> dict:
    """The names the snippets assume (see the module docstring); the costly ones only where ``code`` uses them."""
    from tests.test_compat_audiocraft import build_audiocraft
    from tests.test_patch import MusicGenLike, build_transformers

    torch.manual_seed(0)
    ns = dict(torch=torch, fastcodec=__import__("fastcodec"), z=torch.randn(2, 128, 12),
              wav=torch.randn(1, 1, 2400) * 0.1, wav32=torch.randn(1, 1, 1280) * 0.1,
              chunk=torch.randn(1, 1, 320) * 0.1, mu=torch.randn(128) * 0.1, sigma=torch.rand(128) + 0.5)
    lazy = {"audiocraft_rvq": _audiocraft_rvq, "audiocraft_model": build_audiocraft,
            "musicgen": lambda: MusicGenLike(build_audiocraft(seed=1)), "hf_model": build_transformers}
    for name, make in lazy.items():
        if re.search(rf"\b{name}\b", code):
            ns[name] = make()
    if "encodec_24khz-d7cc33bc.th" in code:
        _checkpoint_24khz(tmp_path)
    for name in ("32khz", "48khz"):
        if f"encodec_{name}/" in code:
            _hf_folder(name, tmp_path)
    if "input_values" in code:  # two stereo clips of the toy 48 kHz folder's rate, the second padded
        ns["input_values"] = torch.randn(2, 2, 100) * 0.1
        ns["padding_mask"] = torch.ones(2, 100, dtype=torch.long)
        ns["padding_mask"][1, 70:] = 0
        ns["input_values"][1, :, 70:] = 0
    return ns


def test_readme_has_python_blocks():
    assert any(not skipped for _, _, skipped in BLOCKS), "README.md has no runnable ```python block"


@pytest.mark.parametrize("line,code,skipped", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip(f"README.md:{line} is marked {SKIP_MARK}")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a shared 2-core machine (see tests/test_streaming.py)
    try:
        namespace = _prelude(code, tmp_path)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_skipped_blocks_are_listed():
    skipped = [line for line, _, s in BLOCKS if s]
    print(f"README ```python blocks skipped ({SKIP_MARK}): {skipped or 'none'}")


def test_extractor():
    text = "x\n```python\na = 1\n```\n<!-- skip-test -->\n\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n", False), (8, "raise SystemExit\n", True)]
    with pytest.raises(AssertionError, match="never closed"):
        python_blocks("```python\na = 1\n")
