"""The sampler against a fake model of known logits, and the generator around it."""

import re
from types import SimpleNamespace

import pytest
import torch

from textdiffusion.config import SamplerConfig
from textdiffusion.core.sampler import DenoisingSampler, DenoisingState
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.schedules import get_schedule

MASK = 4


class FakeMaskedLM(torch.nn.Module):
    """Logits that depend only on the position (and optionally on the input), known in advance."""

    def __init__(self, vocab: int, length: int = 64, seed: int = 0, sharp: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(length, vocab, generator=g) * sharp, requires_grad=False)
        self.config = SimpleNamespace(model_type="fake")
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1).clone())


@pytest.fixture
def fake_gen(tokenizer):
    return DiffusionGenerator(FakeMaskedLM(len(tokenizer)), tokenizer, {"max_length": 32}, device="cpu")


def run(gen, prompts, **kw):
    kw.setdefault("steps", 8)
    return gen.generate(prompts, return_trace=True, **kw)


# -- invariants of every strategy ----------------------------------------------------------------------
STRATEGY_SETTINGS = [
    dict(strategy="remask-random"), dict(strategy="confidence"), dict(strategy="margin"), dict(strategy="entropy"),
    dict(strategy="random"), dict(strategy="confidence", confidence_threshold=0.5),
    dict(strategy="confidence", remask_fraction=0.5), dict(strategy="confidence", block_length=8),
    dict(strategy="confidence", order_temperature=1.0, repetition_penalty=1.5),
]


@pytest.mark.parametrize("settings", STRATEGY_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_prompt_is_kept_and_no_mask_survives(fake_gen, tokenizer, settings):
    out = run(fake_gen, ["The history of", "A river"], **settings)
    first = out.trace[0]
    fixed = first != MASK
    assert torch.equal(out.token_ids[fixed], first[fixed]), "a prompt or special token changed"
    assert not (out.token_ids == MASK).any()
    assert out.texts[0].startswith("The history of") and out.texts[1].startswith("A river")


@pytest.mark.parametrize("settings", [s for s in STRATEGY_SETTINGS if s["strategy"] != "remask-random"
                                      and not s.get("remask_fraction")], ids=str)
def test_carry_over_never_changes_a_committed_token(fake_gen, settings):
    out = run(fake_gen, ["Once", "The cat sat"], **settings)
    for before, after in zip(out.trace, out.trace[1:]):
        committed = before != MASK
        assert torch.equal(after[committed], before[committed])


def test_remasking_can_change_committed_tokens_but_keeps_the_schedule(fake_gen, tokenizer):
    out = run(fake_gen, ["Once"] * 4, steps=10, remask_fraction=0.9, sampling="categorical", temperature=2.0)
    changed = any(bool(((b != MASK) & (a != b)).any()) for b, a in zip(out.trace, out.trace[1:]))
    assert changed, "with remasking some committed token should be re-opened and rewritten"
    assert_masked_counts_follow_schedule(out, "linear", 10)


def assert_masked_counts_follow_schedule(out, schedule, steps):
    n = (out.trace[0] == MASK).sum(1).double()  # [b] masked positions per row at the start
    s = get_schedule(schedule)
    for i, x in enumerate(out.trace[1:]):
        expected = torch.round(s.mask_ratio(torch.tensor(1 - (i + 1) / steps, dtype=torch.float64)) * n).long()
        assert torch.equal((x == MASK).sum(1), expected), (i, expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("strategy", ["confidence", "remask-random", "random"])
def test_number_unmasked_per_step_follows_the_schedule(fake_gen, schedule, strategy):
    out = run(fake_gen, ["Hello", "Hi"], steps=6, schedule=schedule, strategy=strategy)
    assert_masked_counts_follow_schedule(out, schedule, 6)
    if strategy == "remask-random":  # every step resamples, except one that would leave everything masked
        n = int((out.trace[0] == MASK).sum(1).min())
        ratios = get_schedule(schedule).mask_ratio(1 - torch.arange(1, 7, dtype=torch.float64) / 6)
        calls, left = 0, n
        for target in torch.round(ratios * n).long().tolist():
            if left == 0:
                break  # done early: nothing masked, no more steps
            calls += target < n
            left = target
        assert out.nfe == calls
    else:  # a model call exactly where the state changed
        assert out.nfe == sum(not torch.equal(a, b) for a, b in zip(out.trace, out.trace[1:]))


def test_threshold_commits_exactly_the_confident_tokens_or_one(tokenizer):
    vocab = len(tokenizer)
    model = FakeMaskedLM(vocab, sharp=0.0)
    # Position p (1..) gets a peaked distribution whose top probability we set: some above 0.5, some not.
    peak = torch.tensor([0.0, 9.0, 1.0, 9.0, 0.5, 9.0, 2.0] + [0.0] * 57)
    model.table.data[torch.arange(64), 100] = peak
    gen = DiffusionGenerator(model, tokenizer, {"max_length": 7}, device="cpu")
    out = gen.generate(templates=["<mask:5>"], sampling="greedy", confidence_threshold=0.5, return_trace=True)
    probs = model.table[:7].softmax(-1).max(-1).values
    first_step = out.trace[1][0]
    committed = ((first_step != MASK) & (out.trace[0][0] == MASK)).nonzero().flatten().tolist()
    expected = [p for p in range(1, 6) if probs[p] >= 0.5]
    assert committed == expected == [1, 3, 5]
    # the next step has nothing above 0.5 left: exactly one (the most confident) is committed
    second = out.trace[2][0]
    assert ((second != MASK) & (first_step == MASK)).sum() == 1
    assert out.nfe < 5


def test_greedy_is_deterministic_and_seeds_reproduce(fake_gen):
    # greedy tokens in a deterministic order (no order noise): the seed does not matter at all
    a = run(fake_gen, ["The"] * 2, sampling="greedy", order_temperature=0.0, seed=1).texts
    b = run(fake_gen, ["The"] * 2, sampling="greedy", order_temperature=0.0, seed=99).texts
    assert a == b and a[0] == a[1]
    c = run(fake_gen, ["The"] * 3, seed=5, strategy="random", sampling="categorical").texts
    d = run(fake_gen, ["The"] * 3, seed=5, strategy="random", sampling="categorical").texts
    e = run(fake_gen, ["The"] * 3, seed=6, strategy="random", sampling="categorical").texts
    assert c == d and c != e and len(set(c)) > 1


@pytest.mark.parametrize("settings", [dict(), dict(strategy="remask-random"), dict(order_temperature=0.5),
                                      dict(sampling="nucleus", top_p=0.8)], ids=str)
def test_a_sample_does_not_depend_on_its_batch(tokenizer, settings):
    gen = DiffusionGenerator(FakeMaskedLM(len(tokenizer)), tokenizer, {"max_length": 32}, device="cpu")
    prompts = ["The", "A river", "In 1905 the", "Music", "Some", "Paris is", "Water", "It"]
    settings = {"sampling": "categorical", **settings}
    together = gen.generate(prompts, seed=10, **settings).texts
    alone = [gen.generate([p], seed=10 + i, **settings).texts[0] for i, p in enumerate(prompts)]
    assert together == alone


def test_infill_keeps_the_text_around_the_spans(fake_gen):
    out = fake_gen.generate(templates=["The <mask:4> was built in <mask:2>."], steps=6)
    text = out.texts[0]
    assert re.fullmatch(r"The.+ was built in.+\.", text), text  # the fixed text, in order, around the spans
    assert not (out.token_ids == MASK).any()


def test_eos_truncates_the_continuation(tokenizer):
    model = FakeMaskedLM(len(tokenizer), sharp=0.0)
    model.table.data[:, 300] = 5.0
    model.table.data[10, tokenizer.sep_token_id] = 50.0  # the model "ends the text" at position 10
    gen = DiffusionGenerator(model, tokenizer, {"max_length": 20}, device="cpu")
    ids = gen.generate(["Hello"], sampling="greedy").token_ids[0]
    text_tokens = len(tokenizer("Hello", add_special_tokens=False)["input_ids"])
    cut = gen.generate(["Hello"], sampling="greedy").texts[0]
    full = gen.generate(["Hello"], sampling="greedy", stop_at_eos=False).texts[0]
    assert int(ids[10]) == tokenizer.sep_token_id
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 10 - 1  # prompt + up to position 9
    assert len(full) > len(cut) and full.startswith(cut) and text_tokens < 10


def test_suppressed_and_disallowed_tokens_never_appear(tokenizer):
    model = FakeMaskedLM(len(tokenizer), sharp=0.0)
    favourite = tokenizer("Ġthe", add_special_tokens=False)["input_ids"]
    token = tokenizer.convert_tokens_to_ids("Ġthe")
    model.table.data[:, token] = 30.0  # the model wants "the" everywhere
    gen = DiffusionGenerator(model, tokenizer, {"max_length": 16}, device="cpu")
    out = gen.generate(["A"], sampling="greedy", suppress_tokens=["Ġthe"])
    assert token not in out.token_ids[0].tolist() and favourite
    allowed = torch.zeros(16, len(tokenizer), dtype=torch.bool)
    allowed[:, 300:302] = True
    out = gen.generate(["A"], sampling="categorical", allowed=allowed)
    gen_ids = out.token_ids[0][2:-1]
    assert set(gen_ids.tolist()) <= {300, 301}


def test_steps_are_clamped_to_the_masked_count_with_a_note(fake_gen):
    out = fake_gen.generate(templates=["A <mask:3> B"], steps=50)
    assert out.nfe == 3 and any("clamped" in n for n in out.notes)


def test_blocks_finish_left_to_right(fake_gen):
    out = run(fake_gen, ["Go"], steps=8, block_length=8, max_length=20)
    editable = (out.trace[0][0] == MASK).nonzero().flatten()
    first_block, later = editable[:8], editable[8:]
    for x in out.trace[1:]:
        if bool((x[0, later] != MASK).any()):
            assert not bool((x[0, first_block] == MASK).any()), "a later block was opened before the first finished"


def test_a_step_that_commits_nothing_skips_the_model(tokenizer):
    model = FakeMaskedLM(len(tokenizer))
    gen = DiffusionGenerator(model, tokenizer, {"max_length": 8}, device="cpu")
    # cosine: with 6 positions and 6 steps, some steps leave the masked count unchanged
    out = gen.generate(templates=["<mask:6>"], steps=6, schedule="cosine")
    counts = [round(float(get_schedule("cosine").mask_ratio(torch.tensor(1 - (i + 1) / 6, dtype=torch.float64))) * 6)
              for i in range(6)]
    expected_calls = sum(1 for before, after in zip([6] + counts, counts) if after < before)
    assert out.nfe == model.calls == expected_calls < 6


def test_sampler_step_is_usable_without_a_model():
    """The diffusers shape: set_timesteps, then step(logits, state) with any logits."""
    cfg = SamplerConfig(steps=4, sampling="greedy")
    sampler = DenoisingSampler(cfg, mask_token_id=MASK)
    x = torch.tensor([[0, 7, MASK, MASK, MASK, MASK, 2]])
    editable = x == MASK
    sampler.set_timesteps(4, editable)
    state = DenoisingState(x=x, editable=editable, generators=[torch.Generator().manual_seed(0)])
    logits = torch.zeros(1, 7, 20)
    logits[0, :, 11] = 5.0
    while not sampler.finished(state):
        state = sampler.step(logits, state)
    assert state.x.tolist() == [[0, 7, 11, 11, 11, 11, 2]] and state.step_index == 4


@pytest.mark.parametrize("kw, needle", [
    (dict(steps=0), "`steps` must be >= 1, got 0"),
    (dict(top_p=0.0), "`top_p` must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "`top_p`"),
    (dict(top_k=0), "`top_k` must be >= 1, got 0"),
    (dict(temperature=0.0), "`temperature` must be > 0"),
    (dict(temperature=-1.0), "got -1.0"),
    (dict(strategy="best-first"), "`strategy` must be one of"),
    (dict(strategy="remask-random", confidence_threshold=0.9), "cannot be combined"),
])
def test_bad_sampler_settings_name_the_value(kw, needle):
    with pytest.raises(ValueError) as e:
        SamplerConfig(**kw)
    assert needle in str(e.value)


def test_cfg_runs_a_conditional_and_an_unconditional_pass(tokenizer):
    seen = []

    class Recording(FakeMaskedLM):
        def forward(self, input_ids, attention_mask=None):
            seen.append(input_ids.clone())
            return super().forward(input_ids, attention_mask)

    gen = DiffusionGenerator(Recording(len(tokenizer)), tokenizer, {"max_length": 16}, device="cpu")
    out = gen.generate(["The river"], steps=4, cfg_scale=1.5)
    assert not (out.token_ids == MASK).any() and out.texts[0].startswith("The river")
    first = seen[0]
    assert first.shape[0] == 2  # one batch: the prompt, and the prompt masked out
    prompt = (first[0] != MASK) & (first[0] != tokenizer.cls_token_id) & (first[0] != tokenizer.sep_token_id)
    assert (first[1][prompt] == MASK).all() and not (first[0][prompt] == MASK).any()


@pytest.mark.slow  # torch.compile's first compilation: in `make test`, not the edit-test loop
def test_compiled_forward_gives_the_same_samples(tokenizer):
    """The GPU path (torch.compile, static shapes) checked on the CPU: same tokens as eager."""
    from textdiffusion.models.presets import build_preset_model

    torch.manual_seed(0)
    model = build_preset_model("micro", tokenizer, 32)
    eager = DiffusionGenerator(model, tokenizer, {"max_length": 32}, device="cpu")
    compiled = DiffusionGenerator(model, tokenizer, {"max_length": 32}, device="cpu", compile=True)
    for settings in (dict(sampling="greedy"), dict(sampling="topk")):
        a = eager.generate(["The river", "A"], seed=3, steps=6, **settings)
        b = compiled.generate(["The river", "A"], seed=3, steps=6, **settings)
        assert torch.equal(a.token_ids, b.token_ids) and a.nfe == b.nfe


def test_end_of_text_ends_the_row_and_its_tail_costs_no_model_call(tokenizer):
    """A committed end-of-text fills the rest of the continuation at once: no mask is left there to denoise."""
    vocab, sep = len(tokenizer), tokenizer.sep_token_id
    model = FakeMaskedLM(vocab, sharp=0.0)
    model.table.data[:, 100] = 3.0  # every position mildly prefers token 100 ...
    model.table.data[6, sep] = 20.0  # ... but position 6 is surely the end of the text
    gen = DiffusionGenerator(model, tokenizer, {"max_length": 32}, device="cpu")
    kw = dict(steps=29, sampling="greedy", order_temperature=0.0, return_trace=True)
    stopped = gen.generate(["The"], **kw)
    full = gen.generate(["The"], stop_at_eos=False, **kw)
    x = stopped.token_ids[0]
    assert int(x[6]) == sep and (x[6:-1] == sep).all() and not (x == MASK).any()
    before = int((stopped.trace[0][0][:6] == MASK).sum())  # masked positions before the end
    assert full.nfe == 29 and stopped.nfe == 1 + before  # one call commits the end; its tail never costs another
    assert stopped.texts[0] == tokenizer.decode(x[1:6].tolist(), skip_special_tokens=True).strip()
    assert len(full.texts[0]) > len(stopped.texts[0])


def test_end_of_text_in_an_earlier_infill_span_does_not_cut_the_template(tokenizer):
    from textdiffusion.core.sampler import continuation

    editable = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert continuation(editable).tolist() == [[False, False, False, False, False, True, True, True, False]]
    sampler = DenoisingSampler(SamplerConfig(), MASK, eos_token_id=2)
    x = torch.tensor([[0, 2, MASK, 7, 7, MASK, 2, MASK, 2]])
    assert sampler.fill_after_eos(x, continuation(editable)).tolist() == [[0, 2, MASK, 7, 7, MASK, 2, 2, 2]]


def test_step_returns_a_new_state_and_leaves_the_given_one_alone():
    sampler = DenoisingSampler(SamplerConfig(steps=2, sampling="greedy"), mask_token_id=MASK)
    x = torch.tensor([[0, MASK, MASK, 2]])
    sampler.set_timesteps(2, x == MASK)
    state = DenoisingState(x=x.clone(), editable=x == MASK, generators=[torch.Generator().manual_seed(0)])
    logits = torch.zeros(1, 4, 20)
    logits[0, :, 11] = 5.0
    new = sampler.step(logits, state)
    assert torch.equal(state.x, x) and state.step_index == 0
    assert new.step_index == 1 and int((new.x == MASK).sum()) == 1
    assert sampler.skip(new).step_index == 2 and new.step_index == 1
