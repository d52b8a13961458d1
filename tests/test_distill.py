"""`textdiffusion distill` (SDTT): the targets, the loss, the rounds, --resume and the bad-input errors.

The teacher is a micro model trained for a few seconds on a Markov chain of 16 colour words (each word is
followed by the next or the third next): small enough for a CPU test, and context-dependent enough that
what the teacher's second step commits changes its distributions, which is what a student must learn.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from textdiffusion.cli.main import main
from textdiffusion.config import DiffusionConfig, SamplerConfig
from textdiffusion.core.denoiser import MaskedDiffusionLM
from textdiffusion.errors import UsageError
from textdiffusion.pipelines.distillation import (
    DistillPlan,
    Layout,
    TeacherRun,
    check_step_plan,
    distill_loss,
    distillation_batch,
    divergence,
    held_out_divergence,
    make_batch,
    start_states,
)

WORDS = "red orange yellow green blue indigo violet black white grey brown pink gold silver olive teal".split()
LENGTH = 38  # [cls] + 4 prompt tokens + 32 generated in 4 blocks of 8 + [sep]
GENERATION = SamplerConfig(steps=16, block_length=8)


def colour_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + WORDS)}
    word = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=word, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def markov_documents(n: int, seed: int = 0, length: int = 60) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        i, words = rng.randrange(len(WORDS)), []
        for _ in range(length):
            words.append(WORDS[i])
            i = (i + rng.choice((1, 3))) % len(WORDS)
        docs.append(" ".join(words))
    return docs


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """(teacher checkpoint dir, tokenizer, train blocks, validation blocks, corpus file)."""
    from textdiffusion.core.collator import collator_for_tokenizer
    from textdiffusion.core.data import pack
    from textdiffusion.core.loss import diffusion_loss
    from textdiffusion.models.presets import build_preset_model

    tmp = tmp_path_factory.mktemp("colours")
    tokenizer = colour_tokenizer()
    docs = markov_documents(300)
    corpus = tmp / "colours.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    train, val = pack(docs[:270], tokenizer, LENGTH), pack(docs[270:], tokenizer, LENGTH)[:16]
    torch.manual_seed(0)
    model = build_preset_model("micro", tokenizer, LENGTH)
    denoiser = MaskedDiffusionLM(model)
    collator = collator_for_tokenizer(tokenizer, prefix_length=5, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        diffusion_loss(denoiser, collator(train[torch.randint(len(train), (32,), generator=g)])).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    DiffusionConfig(max_length=LENGTH, mask_token_id=tokenizer.mask_token_id, cls_token_id=tokenizer.cls_token_id,
                    sep_token_id=tokenizer.sep_token_id, generation=GENERATION).save_pretrained(path)
    return path, tokenizer, train, val, corpus


def plan_for(tokenizer, **generation) -> DistillPlan:
    config = SamplerConfig(**{**vars(GENERATION), **generation})
    return DistillPlan(config, Layout(LENGTH, 5, config.block_length), tokenizer.mask_token_id, tokenizer.pad_token_id,
                       tokenizer.sep_token_id, (tokenizer.pad_token_id, tokenizer.cls_token_id))


def load_teacher(path: Path):
    from textdiffusion.models.loading import load_masked_lm

    _, model = load_masked_lm(str(path))
    return MaskedDiffusionLM(model).eval().requires_grad_(False)


# -- the pieces ---------------------------------------------------------------------------------------
def test_divergences():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    for kind in ("reverse-kl", "forward-kl", "tvd"):
        assert divergence(a, a.log_softmax(-1), kind).abs().max() < 1e-6
        assert (divergence(a, b.log_softmax(-1), kind) > 0).all()
    p, q = a.log_softmax(-1), b.log_softmax(-1)
    assert torch.allclose(divergence(a, q, "reverse-kl"), (p.exp() * (p - q)).sum(-1), atol=1e-6)  # KL(student || teacher)
    assert torch.allclose(divergence(a, q, "forward-kl"), (q.exp() * (q - p)).sum(-1), atol=1e-6)
    assert (divergence(a, q, "tvd") <= 1).all()


def test_each_position_takes_the_teacher_step_where_it_was_committed():
    """Hand-made run of 2 steps on one chain of 5 positions; log_probs row r is a distinct distribution."""
    M = 9
    states = torch.tensor([[[1, M, M, M, M]],  # x_t: four masked
                           [[1, 5, M, 6, M]],  # step 1 commits positions 1 and 3
                           [[1, 5, 7, M, M]]])  # step 2 commits position 2 and re-masks 3 (remask-random)
    read = torch.tensor([[[-1, 0, 1, 2, 3]],  # step 1 read the four masked positions
                         [[-1, -1, 4, -1, 5]]])  # step 2 read the two still masked
    log_probs = torch.log_softmax(torch.randn(6, 11), -1)
    batch = distillation_batch(TeacherRun(states, read, log_probs), torch.ones(1, 5, dtype=torch.long), M)
    assert batch.positions.tolist() == [[False, True, True, True, True]]
    # 1: committed at step 1 and kept -> step 1's; 2: committed at step 2 -> step 2's; 3: committed at step 1,
    # re-masked at step 2, not read there -> step 1's; 4: still masked -> step 2's
    expected = log_probs[[0, 4, 2, 5]]
    assert torch.equal(batch.targets, expected)


def test_start_states_commit_earlier_blocks_and_stop_at_the_first_end_of_text(colours):
    _, tokenizer, train, _, _ = colours
    plan = plan_for(tokenizer)
    blocks = train[:64].clone()
    blocks[:32, 5 + 8 + 3] = tokenizer.sep_token_id  # a document ends inside block 1 of these rows
    x, editable, _, sampler = start_states(blocks, plan, 16, torch.Generator().manual_seed(0))
    masked = x == tokenizer.mask_token_id
    block = sampler.blocks(editable)
    current = torch.where(masked, block, 99).min(1).values  # [c]
    assert sampler.steps_per_block == 4 and sampler.num_blocks == 4
    assert set(current.tolist()) == {0, 1, 2, 3} and (current[:32] <= 1).all()
    assert torch.equal(masked, editable & (block >= current[:, None]))  # the current block and the later ones
    assert torch.equal(x[~masked], blocks[~masked])  # everything else is the real text


def test_a_student_equal_to_the_teacher_matches_its_first_step_exactly(colours):
    path, tokenizer, _, val, _ = colours
    teacher = load_teacher(path)
    batch = make_batch(teacher, val, plan_for(tokenizer), 16, None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        from textdiffusion.core.denoiser import masked_logits

        d = divergence(masked_logits(teacher, batch.x, batch.attention, batch.positions), batch.targets)
    assert batch.x.shape[0] == 2 * len(val)  # 4 steps per block: 2 states per chain
    assert (d.abs() < 1e-5).sum() > 0 and d.max() > 0.1  # first-step positions: 0; second-step ones: the lesson


def test_distillation_lowers_the_divergence_on_held_out_blocks(colours):
    """60 steps of the default reverse KL: the student's one step comes closer to the teacher's two (8 -> 4
    steps: the teacher commits a block in two halves, the student in one) on blocks it never trained on."""
    path, tokenizer, train, val, _ = colours
    teacher, student = load_teacher(path), load_teacher(path).train().requires_grad_(True)
    plan = plan_for(tokenizer)
    before = held_out_divergence(student, teacher, val, plan, 8)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        batch = make_batch(teacher, train[torch.randint(len(train), (8,), generator=g)], plan, 8, 8, g)
        distill_loss(student, batch, "reverse-kl").backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_divergence(student, teacher, val, plan, 8)
    assert after < 0.99 * before, (before, after)


@pytest.mark.parametrize("steps, rounds, needle", [
    (15, 1, "must be a multiple of 4 x 2^1 = 8"),
    (8, 3, "cannot be halved 3 time(s)"),
    (64, 1, "more steps than positions"),
])
def test_step_counts_the_rounds_cannot_halve_are_refused(steps, rounds, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        check_step_plan(steps, rounds, Layout(LENGTH, 5, 8))
    check_step_plan(32, 2, Layout(LENGTH, 5, 8))  # 8 steps per block -> 4 -> 2


# -- the command --------------------------------------------------------------------------------------
def distill(colours, out: Path, *extra: str) -> int:
    """The command on the toy teacher; the quality gate is off unless the test sets it up (a SmolLM2 scorer may be
    installed or not: the result must not depend on it)."""
    path, _, _, _, corpus = colours
    gate = [] if "--gate-prompts" in extra else ["--no-quality-gate"]
    return main(["distill", *gate, "--teacher", str(path), "--dataset", str(corpus), "--output-dir", str(out),
                 "--start-steps", "16", "--rounds", "2", "--steps-per-round", "4", "--batch-size", "8",
                 "--eval-steps", "2", "--eval-blocks", "8", "--logging-steps", "2", "--save-total-limit", "10",
                 "--learning-rate", "1e-3", "--ema", "0.5", *extra])


@pytest.fixture(scope="module")
def distilled(colours, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilled") / "run"
    assert distill(colours, out) == 0
    return out


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_weights(a: dict, b: dict) -> bool:
    shared = set(a) & set(b)
    return bool(shared) and all(torch.equal(a[k], b[k]) for k in shared)


def test_each_round_halves_the_steps_and_makes_the_student_the_teacher(distilled, colours, capsys):
    state = json.loads((distilled / "checkpoint-4" / "distill_state.json").read_text())
    assert state["index"] == 2 and state["teacher_steps"] == 8  # round 1 done: 16 -> 8
    assert [r["teacher_steps"] for r in state["history"]] == [16]
    teacher_after = tensors(distilled / "checkpoint-4" / "teacher.safetensors")
    assert same_weights(teacher_after, tensors(distilled / "checkpoint-4" / "ema.safetensors"))  # the judged model
    assert not same_weights(teacher_after, tensors(distilled / "checkpoint-2" / "teacher.safetensors"))
    assert same_weights(tensors(distilled / "checkpoint-2" / "teacher.safetensors"), tensors(colours[0] / "model.safetensors"))
    rounds = (distilled / "distill_rounds.csv").read_text().splitlines()
    assert rounds[0].startswith("step,round,teacher_steps,student_steps") and len(rounds) == 3
    assert [line.split(",")[2:4] for line in rounds[1:]] == [["16", "8"], ["8", "4"]]
    # the result is a normal checkpoint whose saved default is the distilled step count: generate samples with it
    # (a 4-word prompt, as the distillation laid out its examples: 32 positions in 4 blocks)
    config = DiffusionConfig.from_pretrained(distilled)
    assert config.generation.steps == 4 and config.generation.block_length == 8
    assert same_weights(tensors(distilled / "model.safetensors"), tensors(distilled / "checkpoint-8" / "teacher.safetensors"))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(distilled), "--prefix", "red orange yellow green", "--hide-steps", "--device", "cpu"]) == 0
    assert "4 model calls (NFE)" in capsys.readouterr().out


def test_resume_mid_round_gives_the_uninterrupted_weights(distilled, colours, tmp_path, capsys):
    crashed = tmp_path / "run"
    shutil.copytree(distilled, crashed)
    for p in crashed.iterdir():  # as if killed after checkpoint-6, mid-way through round 2
        if p.name not in ("run_args.json", "validation_curve.csv", "distill_rounds.csv") and not p.name.startswith("checkpoint-") \
                or p.name == "checkpoint-8":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    capsys.readouterr()
    assert distill(colours, crashed, "--resume") == 0
    assert f"resuming from {crashed / 'checkpoint-6'} (step 6)" in capsys.readouterr().out
    for name in ("model.safetensors", "checkpoint-8/model.safetensors", "checkpoint-8/teacher.safetensors",
                 "checkpoint-8/ema.safetensors"):
        assert tensors(crashed / name).keys() == tensors(distilled / name).keys()
        assert same_weights(tensors(crashed / name), tensors(distilled / name)), name
    assert (crashed / "distill_rounds.csv").read_text() == (distilled / "distill_rounds.csv").read_text()


class FakeScorer:
    """Gen PPL in the order the gate asks for it: the bar (teacher at --start-steps), then per round the student and the
    undistilled teacher at the halved count."""

    name = "fake"

    def __init__(self, values):
        self.values = list(values)

    def perplexity(self, prompts, continuations):
        return self.values.pop(0)


def test_a_round_that_fails_the_quality_gate_stops_and_keeps_the_previous_model(colours, tmp_path, monkeypatch, capsys):
    from textdiffusion.models.quality import Scorer

    scorer = FakeScorer([10.0, 10.5, 12.0, 30.0, 40.0])  # round 1 holds (10.5 <= 11), round 2 does not (30 > 11)
    monkeypatch.setattr(Scorer, "load", classmethod(lambda cls, spec, device="cpu": scorer))
    out = tmp_path / "run"
    assert distill(colours, out, "--start-steps", "32", "--rounds", "3", "--steps-per-round", "2", "--gate-prompts", "4",
                   "--gate-tolerance", "0.1") == 0
    printed = capsys.readouterr().out
    assert "gen PPL 10.5" in printed and "quality NOT held: stopping" in printed and not scorer.values
    rounds = [line.split(",") for line in (out / "distill_rounds.csv").read_text().splitlines()[1:]]
    assert [r[-1] for r in rounds] == ["True", "False"]
    assert not (out / "checkpoint-6").exists()  # round 3 never ran
    assert DiffusionConfig.from_pretrained(out).generation.steps == 16  # round 1's student (32 -> 16), not round 2's
    assert same_weights(tensors(out / "model.safetensors"), tensors(out / "checkpoint-2" / "teacher.safetensors"))
    assert not same_weights(tensors(out / "model.safetensors"), tensors(out / "checkpoint-4" / "ema.safetensors"))
    # each round's judged model is its own checkpoint, the refused one included, at the step count it learnt
    assert same_weights(tensors(out / "round-1" / "model.safetensors"), tensors(out / "model.safetensors"))
    assert same_weights(tensors(out / "round-2" / "model.safetensors"), tensors(out / "checkpoint-4" / "ema.safetensors"))
    assert [DiffusionConfig.from_pretrained(out / f"round-{i}").generation.steps for i in (1, 2)] == [16, 8]
    kept = tensors(out / "model.safetensors")
    (out / "model.safetensors").unlink()  # cut off after the stop's checkpoint, before the result was written
    assert distill(colours, out, "--start-steps", "32", "--rounds", "3", "--steps-per-round", "2", "--gate-prompts", "4",
                   "--gate-tolerance", "0.1", "--resume") == 0
    assert same_weights(tensors(out / "model.safetensors"), kept) and not (out / "checkpoint-6").exists()
    assert DiffusionConfig.from_pretrained(out).generation.steps == 16


def test_bad_input_is_one_line_with_exit_status_2(colours, tmp_path, capsys):
    from textdiffusion.models.autoregressive import build_ar_model

    path, tokenizer, _, _, corpus = colours
    ar = tmp_path / "ar"
    build_ar_model("micro", tokenizer, LENGTH).save_pretrained(ar)
    tokenizer.save_pretrained(ar)
    wiki = tmp_path / "wiki.jsonl"
    from textdiffusion.core.data import load_corpus

    wiki.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("wiki-vital").train[:100]))
    cases = [
        (["--teacher", str(ar)], "is an autoregressive checkpoint"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--start-steps", "15"], "--start-steps 15 cannot be halved 2 time(s)"),
        (["--start-steps", "8", "--rounds", "3"], "--start-steps 8 cannot be halved 3 time(s)"),
        (["--dataset", str(wiki)], "of its tokens are unknown to the tokenizer of --teacher"),
        (["--preset", "micro"], "--preset 'micro' does not apply to `distill`"),
    ]
    for extra, needle in cases:
        capsys.readouterr()
        argv = ["distill", "--teacher", str(path), "--dataset", str(corpus), "--output-dir", str(tmp_path / "out"),
                "--start-steps", "16", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (extra, err)
        assert not (tmp_path / "out").exists()


def test_the_round_curve_reads_each_checkpoints_judged_student(distilled, colours, tmp_path):
    """benchmarks/distill_curve.py: step 0 is the teacher, then each round-1 checkpoint's EMA, at the round's new step
    count on the gate's prompts; the row at the round's end is what the round's saved student gives."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill_curve

    from textdiffusion.core.data import load_corpus
    from textdiffusion.models.loading import load_diffusion_model
    from textdiffusion.models.quality import prompts_from_documents
    from textdiffusion.pipelines.distillation import QualityGate

    out = tmp_path / "curve"
    distill_curve.main(["--run", str(distilled), "--scorer", "none", "--prompts", "4", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["distill_step"] for r in rows] == [0, 2, 4] and {r["steps"] for r in rows} == {8}
    assert (out / "curve.png").stat().st_size > 0 and "| 4 |" in (out / "README.md").read_text()
    corpus = str(colours[4])
    direct = []  # the same measurement made directly on the teacher and on the round's saved student
    for folder in (colours[0], distilled / "round-1"):
        config = DiffusionConfig.from_pretrained(folder)
        tokenizer, model = load_diffusion_model(str(folder), config)
        prompts = prompts_from_documents(load_corpus(corpus).validation, tokenizer, 4, 4, 32, corpus)
        gate = QualityGate(tokenizer, config, DiffusionConfig.from_pretrained(distilled / "round-1").generation, prompts,
                           32, None, 0.0, "cpu")
        direct.append(gate.measure(model, 8)["example"][:200])
    assert direct == [rows[0]["example"], rows[2]["example"]] and direct[0] != direct[1]


def test_the_divergence_floor_bounds_what_a_student_can_reach(colours):
    """benchmarks/distill_floor.py: with one teacher run the best one step is that run's own targets (floor 0); with
    several, the floor is positive and no model's one step (the teacher's own here) goes below it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill_floor

    from textdiffusion.pipelines.generation import DiffusionGenerator

    path, _, _, val, _ = colours
    teacher = DiffusionGenerator.from_pretrained(str(path), device="cpu")
    one = distill_floor.measure(teacher, teacher, 16, val[:8], draws=1)
    assert abs(one["floor"]) < 1e-4 and one["teacher_one_step"] == one["student_one_step"] > 0
    several = distill_floor.measure(teacher, teacher, 16, val[:8], draws=6)
    assert 0 < several["floor"] <= several["teacher_one_step"] + 1e-6
