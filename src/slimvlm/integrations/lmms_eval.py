"""lmms-eval's `--model slimvlm`: any checkpoint slimvlm supports, with token-reduction methods applied.

lmms-eval's benchmarks are where a method's accuracy is checked, so a method has to run there as users run it:
the checkpoint's own class and generate(), slimvlm.apply() in between. Registered through lmms-eval's
`lmms_eval.models` entry point (pyproject.toml), so `pip install slimvlm[eval]` is all it takes:

    python -m lmms_eval --model slimvlm --model_args pretrained=DIR,methods=tome:r=8+fastv:k=2;ratio=0.5 --tasks ...

lmms-eval splits model_args at commas, so a method's options are separated by ';' here (',' in slimvlm's own
specs) and methods of different stages are composed with '+', as on slimvlm's command line. What the methods
did (visual tokens per sample) and where the time went (vision stages, prefill, decode) are added to
lmms-eval's results under "throughput" (lmms-eval names each such number avg_NAME) and logged.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import PIL.Image
import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger

from ..api import apply
from ..bench.clock import GenerateClock
from ..errors import SlimVLMError
from ..models.loading import DTYPES, load_model, resolve_device
from ..registry import build, check_compatible, check_runs

MODEL = "slimvlm"


def manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point hands lmms-eval: the model's name and class."""
    return ModelManifest(model_id=MODEL, simple_class_path=f"{__name__}.SlimVLM")


def method_specs(text: str) -> list[str]:
    """'tome:r=8+fastv:k=2;ratio=0.5' -> ['tome:r=8', 'fastv:k=2,ratio=0.5']: '+' composes methods, ';'
    separates a method's options (lmms-eval has split model_args at every ',')."""
    specs = [spec.strip().replace(";", ",") for spec in str(text).split("+")]
    if not all(specs):
        raise SlimVLMError(f"methods={text!r} has an empty method; write e.g. methods=tome:r=8+fastv:k=2;ratio=0.5")
    return specs


@dataclass
class RunStats:
    """What this process measured: per sample ('task/split/doc'), the visual tokens that reached the LLM (summed
    over its images), keyed so that the requests lmms-eval repeats to even out processes count once; in seconds
    over all its generate() calls, the vision stages, prefill and decode; new tokens generated."""

    visual_tokens: dict[str, int] = field(default_factory=dict)
    vision: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    new_tokens: int = 0

    @staticmethod
    def combined(parts: Sequence["RunStats"]) -> "RunStats":
        """The statistics of several processes as one run's."""
        return RunStats(visual_tokens={key: t for part in parts for key, t in part.visual_tokens.items()},
                        **{name: sum(getattr(part, name) for part in parts) for name in ("vision", "prefill", "decode", "new_tokens")})

    def summary(self) -> dict[str, float]:
        samples, tokens = len(self.visual_tokens), list(self.visual_tokens.values())
        per_sample_ms = {f"{name}_ms_per_sample": 1000 * getattr(self, name) / samples for name in ("vision", "prefill", "decode")}
        return {"samples": samples, "visual_tokens_mean": statistics.mean(tokens),
                "visual_tokens_min": min(tokens), "visual_tokens_max": max(tokens),
                "vision_s": self.vision, "prefill_s": self.prefill, "decode_s": self.decode, **per_sample_ms}


class SlimVLM(lmms):
    """A slimvlm-supported checkpoint with `methods` applied, answering lmms-eval's generate_until requests in
    batches of `batch_size` with the model's own generate(). A bad method, a method the checkpoint refuses or a
    checkpoint class slimvlm has no adapter for fails here, at load, with SlimVLMError."""

    def __init__(self, pretrained: str, methods: str = "none", dtype: str = "float32", attn_implementation: str = "sdpa",
                 device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None, **unknown) -> None:
        # lmms-eval passes device, batch_size and max_batch_size from its own options; batches are batch_size samples
        super().__init__()
        if unknown:
            raise SlimVLMError(f"--model slimvlm has no model_args {', '.join(sorted(unknown))}: it takes pretrained, methods, "
                               "dtype, attn_implementation; lmms-eval splits model_args at ',', so separate a method's "
                               "options with ';' (methods=fastv:k=2;ratio=0.5)")
        if str(dtype) not in DTYPES:
            raise SlimVLMError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
        try:
            self.batch_size_per_process = int(batch_size)
        except ValueError:
            raise SlimVLMError(f"--batch_size {batch_size}: --model slimvlm takes a number of samples, e.g. 8") from None
        self.accelerator = Accelerator()
        self._world_size = self.accelerator.num_processes
        self._rank = self.accelerator.process_index
        self._device = self.accelerator.device if self._world_size > 1 else resolve_device(device or "auto")
        self.specs = method_specs(methods)
        check_compatible([build(spec) for spec in self.specs])  # a bad spec fails before the weights are read
        self.model, self.processor = load_model(str(pretrained), self._device, str(dtype), str(attn_implementation))
        if self.processor is None:
            raise SlimVLMError(f"{pretrained} has no processor; give a model folder with its processor (or 'testbed')")
        check_runs(self.model, [self.specs])
        self.handle = apply(self.model, self.specs)
        self.clock = GenerateClock(self.handle)
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        config = self.model.generation_config
        self.pad_id = next(i for i in (config.pad_token_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None)
        self.stats = RunStats()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    def prompt(self, context: str, images: int) -> str:
        """The task's text as the model's prompt: as it is when it holds the image placeholders, else through the
        processor's chat template when it has one, else after one placeholder per image and a new line."""
        if self.image_token in context:
            return context
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                      tokenize=False)
        return self.image_token * images + "\n" + context

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def longest_first(args) -> tuple[int, str]:  # fewer pad tokens per batch
            return -len(self.tokenizer.encode(args[0])), args[0]

        order = utils.Collator([request.args for request in requests], longest_first, grouping=True)
        answers = []
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, options, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            images = [self._images(visual(self.task_dict[task][split][doc]))
                      for visual, doc, task, split in zip(doc_to_visual, doc_ids, tasks, splits)]
            keys = [f"{task}/{split}/{doc}" for doc, task, split in zip(doc_ids, tasks, splits)]
            answers += self._answer(list(contexts), images, dict(options[0]), keys)
        return order.get_original(answers)

    def _images(self, visuals) -> list[PIL.Image.Image]:
        if not visuals or not all(isinstance(v, PIL.Image.Image) for v in visuals):
            raise SlimVLMError("--model slimvlm answers tasks whose documents hold images; this task gives "
                               f"{[type(v).__name__ for v in visuals] or 'none'}")
        return list(visuals)

    def _answer(self, contexts: list[str], images: list[list[PIL.Image.Image]], options: dict, keys: list[str]) -> list[str]:
        """One batch: the prompts, one greedy (or sampled, if the task asks) generate(), the answers cut at the
        task's stop strings; what it did added to self.stats."""
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        inputs = self.processor(images=[image for item in images for image in item],
                                text=[self.prompt(c, len(i)) for c, i in zip(contexts, images)],
                                return_tensors="pt", padding=True, padding_side="left")
        parameter = next(self.model.parameters())
        inputs = inputs.to(parameter.device, dtype=parameter.dtype)  # casts only float tensors
        if int(options.get("num_beams") or 1) != 1:  # the clock reads the first token off a streamer, which beams refuse
            raise SlimVLMError(f"--model slimvlm generates greedily or by sampling; this task asks num_beams={options['num_beams']}")
        sample = bool(options.get("do_sample")) and float(options.get("temperature") or 0) > 0
        settings = dict(max_new_tokens=int(options.get("max_new_tokens", 128)), do_sample=sample, pad_token_id=self.pad_id)
        if sample:
            settings.update(temperature=float(options["temperature"]), top_p=options.get("top_p"))
        with torch.inference_mode():
            output, split = self.clock.generate(self.model, **inputs, **settings)
        new = output[:, inputs["input_ids"].shape[1]:]
        self._record(keys, images, split, int((new != self.pad_id).sum()))
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def _record(self, keys: list[str], images: list[list[PIL.Image.Image]], split, new_tokens: int) -> None:
        counts = self.handle.stats.visual_tokens  # per image, in batch order
        ends = [sum(len(item) for item in images[: i + 1]) for i in range(len(images))]
        for key, item, end in zip(keys, images, ends):
            self.stats.visual_tokens[key] = sum(counts[end - len(item): end])
        self.stats.vision += split.vision
        self.stats.prefill += split.prefill
        self.stats.decode += split.decode
        self.stats.new_tokens += new_tokens

    def clean(self) -> None:
        """lmms-eval calls this on every process once the answers are in: the processes' statistics are merged
        and the first process adds them to lmms-eval's results."""
        stats = self.stats
        if self._world_size > 1:
            gathered = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, asdict(stats))
            stats = RunStats.combined([RunStats(**part) for part in gathered])
        if self._rank == 0 and stats.visual_tokens:
            summary = stats.summary()
            elapsed = stats.vision + stats.prefill + stats.decode
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=stats.new_tokens,
                        avg_speed=stats.new_tokens / elapsed if elapsed else 0.0, additional_metrics=summary)
            logger.info(f"slimvlm {'+'.join(self.specs)}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        self.clock.close()
        self.handle.remove()
        super().clean()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("--model slimvlm answers generate_until tasks; log-likelihood (multiple choice) "
                                  "tasks are not supported yet")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model slimvlm answers generate_until tasks; multi-round generation is not supported")


def _cut(text: str, until: list[str]) -> str:
    """The text up to the first of the stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
