"""The request bodies, strictly typed: an unknown field, a wrong type or a value out of range is a 422
that names the field and the value (pydantic does the naming; ``app.py`` shapes the answer)."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from textdiffusion.config import SamplerConfig
from textdiffusion.pipelines.guidance import GUIDANCE, MAX_PARTICLES

_DEFAULTS = {f.name: f.default for f in fields(SamplerConfig)}  # the sampler's defaults, not typed twice
MAX_STEPS = 1024
MAX_SAMPLES = 32
# The server's own caps on top of the sampler's ranges: bounds on the work one request may ask for
SERVER_CAPS = {"steps": {"le": MAX_STEPS}, "temperature": {"le": 100}, "order_temperature": {"le": 100},
               "repetition_penalty": {"le": 100}, "eb_gamma": {"le": 1000}}


def _sampler_field(name: str, **extra):
    """A request field for sampler setting ``name``: the checkpoint-independent default and the range of
    ``SamplerConfig.RANGES`` (declared once, in config.py), tightened by the server's cap where it has one."""
    bounds = {k: v for k, v in SamplerConfig.RANGES[name].items() if k in ("gt", "ge", "lt", "le")}
    bounds.update(SERVER_CAPS.get(name, {}))
    return Field(_DEFAULTS[name], **bounds, **extra)

Strategy = Literal[SamplerConfig.RANGES["strategy"]["choices"]]  # type: ignore[valid-type]  # the sampler's own lists
Sampling = Literal[SamplerConfig.RANGES["sampling"]["choices"]]  # type: ignore[valid-type]
Schedule = Literal[SamplerConfig.RANGES["schedule"]["choices"]]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN and Infinity are not JSON


def _not_blank(value: Optional[str]) -> Optional[str]:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class GenerateRequest(_Strict):
    """POST /v1/generate: a prompt to continue or a template with ``<mask:N>`` spans, and every sampler setting."""

    prompt: Optional[str] = Field(None, description="Text to continue (the rest of the block is generated).")
    template: Optional[str] = Field(None, description="Text with masked spans, e.g. 'The <mask:12> was built in <mask:3>.'")
    max_length: Optional[int] = Field(None, ge=4, description="Tokens per sample, prompt included (default: the checkpoint's).")
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="Samples; sample i uses seed + i.")
    seed: int = Field(0, ge=0, lt=2 ** 63 - MAX_SAMPLES)
    steps: int = _sampler_field("steps")
    schedule: Schedule = _DEFAULTS["schedule"]
    strategy: Strategy = _DEFAULTS["strategy"]
    sampling: Sampling = _DEFAULTS["sampling"]
    temperature: float = _sampler_field("temperature")
    top_k: int = _sampler_field("top_k")
    top_p: float = _sampler_field("top_p")
    confidence_threshold: Optional[float] = _sampler_field("confidence_threshold")
    remask_fraction: float = _sampler_field("remask_fraction")
    block_length: Optional[int] = _sampler_field("block_length")
    order_temperature: float = _sampler_field("order_temperature")
    repetition_penalty: float = _sampler_field("repetition_penalty")
    eb_gamma: float = _sampler_field("eb_gamma", description="Entropy budget of strategy 'eb' (nats).")
    cfg_scale: float = Field(0.0, ge=0, le=100, description="Classifier-free guidance by the prompt or the template's "
                             "text (doubles the request's rows).")
    label: Optional[str] = Field(None, max_length=200, description="Write text of this class: one of the labels "
                                 "GET /v1/models lists (the checkpoint's, or the server's guide's).")
    guidance: Optional[Literal[GUIDANCE]] = Field(None, description="How `label` steers: cfg (by `cfg_scale`), "  # type: ignore[valid-type]
                                                  "classifier or smc (by the server's --guide).")
    guidance_scale: float = Field(2.0, ge=0, le=100, description="Strength of classifier or smc guidance.")
    particles: int = Field(8, ge=1, le=MAX_PARTICLES, description="smc: partial generations per sample (rows).")
    suppress_tokens: list[str] = Field(default_factory=list, max_length=256)
    stop_at_eos: bool = True
    stream: bool = Field(False, description="Server-sent events: every step's tokens, masks and confidence.")
    timeout: Optional[float] = Field(None, gt=0, le=3600, description="Seconds from arrival after which the request "
                                     "is dropped and answered 504 (a stream ends with an error event).")

    _check_prompt = field_validator("prompt", "template", "label")(_not_blank)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.prompt is None) == (self.template is None):
            raise ValueError("give exactly one of `prompt` or `template`")
        return self

    def sampler_kwargs(self) -> dict:
        """The sampler settings this request set; the rest come from the checkpoint's generation defaults."""
        return {name: getattr(self, name) for name in _DEFAULTS if name in self.model_fields_set}


class CompletionRequest(_Strict):
    """POST /v1/completions: the OpenAI subset (prompt, max_tokens, temperature, top_p, n, seed, stream).

    ``temperature`` 0 means greedy; ``top_p`` switches to nucleus sampling; otherwise the checkpoint's
    generation defaults apply (top-k 50)."""

    model: Optional[str] = None
    prompt: str = Field(..., min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63 - MAX_SAMPLES)
    stream: bool = False
    timeout: Optional[float] = Field(None, gt=0, le=3600)

    _check_prompt = field_validator("prompt")(_not_blank)

    def sampler_kwargs(self) -> dict:
        kwargs = {}
        if self.temperature == 0:
            kwargs["sampling"] = "greedy"
        elif self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.top_p is not None and self.temperature != 0:
            kwargs.update(sampling="nucleus", top_p=self.top_p)
        return kwargs
