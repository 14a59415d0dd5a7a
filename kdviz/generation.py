"""Responses written by a model (student-generated output, or the teacher's for sequence-level KD).

`generate_responses` continues each example's prompt, batched with left padding, until EOS or the
chat template's end-of-turn token or `max_new_tokens`. Sampling is reproducible whatever the batch:
each (prompt, sample) draws from its own random generator, seeded from the seed, the prompt's
token ids and the sample's index (`temperature=0` is greedy and equals `model.generate(do_sample=False)`).
`with_responses` turns the continuations into examples whose generated tokens are the targets.

>>> from kdviz import zoo
>>> model, tokenizer = zoo.load("zoo:student")
>>> settings = Sampling(max_new_tokens=4, temperature=0.0)
>>> out = generate_responses(model, [[1, 2, 3]], settings, stop_ids=[tokenizer.eos_token_id], pad_id=0)
>>> len(out[0][0]) <= 4
True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from kdviz import distributed
from kdviz.checks import check_count, check_non_negative, is_real
from kdviz.data import IGNORE_INDEX, Example, TokenDataset, example_key, pad_id, stop_ids
from kdviz.files import cache_root, move_aside, warn, write_text
from kdviz.models import fingerprint, position_ids
from kdviz.pair import ModelPair

SOURCES = ("student", "teacher")


@dataclass(frozen=True)
class Sampling:
    """How responses are written: greedy at temperature 0, else sampled (nucleus `top_p`), K per prompt."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        check_count(self.max_new_tokens, "max_new_tokens", minimum=1)
        check_non_negative(self.temperature, "sample temperature", hint="(0 = greedy)")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}.")
        check_count(self.samples_per_prompt, "samples_per_prompt", minimum=1)
        check_count(self.seed, "seed", minimum=0)
        check_count(self.batch_size, "batch_size", minimum=1)
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} with temperature 0: greedy decoding writes "
                             "one response per prompt; sample (temperature > 0) for several.")

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "batch_size"}  # (it changes nothing)


def prompt_of(example: Example) -> list[int]:
    """The ids before the example's first target (the whole example when nothing is a target)."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.input_ids))
    return example.input_ids[:first]


def _seed(seed: int, prompt: list[int], sample: int) -> int:
    import xxhash

    return xxhash.xxh64(str((seed, sample, prompt)).encode()).intdigest() >> 1


def _choose(logits: Tensor, settings: Sampling, generator: torch.Generator) -> int:
    """One token from fp32 logits [V]: the argmax, or a draw from the tempered, nucleus-cut distribution."""
    if settings.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / settings.temperature, -1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > settings.top_p  # keeps the token that crosses top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def _continue(model, prompts: list[list[int]], generators: list[torch.Generator], settings: Sampling,
              stop_ids: set[int], pad_id: int, context: int | None) -> list[list[int]]:
    """Continuations of a batch of prompts (left padding, the model's KV cache), each with its own generator;
    a continuation also stops where prompt + response fill `context` tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out, past, step_ids = [[] for _ in prompts], None, ids
    room = [settings.max_new_tokens if context is None else min(settings.max_new_tokens, context - len(p))
            for p in prompts]
    done = [r <= 0 for r in room]
    cache_name = _cache_argument(model)
    for _ in range(max(room)):
        if all(done):
            break
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=position_ids(mask)[:, -step_ids.shape[1]:],
                       use_cache=True, **{cache_name: past})
        past, logits = result[cache_name], result.logits[:, -1].float()
        chosen = [pad_id if done[row] else _choose(logits[row], settings, generators[row]) for row in range(len(out))]
        for row, token in enumerate(chosen):
            if not done[row]:
                out[row].append(token)
                done[row] = token in stop_ids or len(out[row]) >= room[row]
        step_ids = torch.tensor(chosen, device=device)[:, None]
        mask = torch.cat([mask, torch.tensor([[0 if d else 1] for d in done], device=device)], 1)
    return out


def _cache_argument(model) -> str:
    """The name a model's forward takes its KV cache under: `cache` (transformers 5.25 on), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_responses(model, prompts: list[list[int]], settings: Sampling, *, stop_ids, pad_id: int,
                       context: int | None = None) -> list[list[list[int]]]:
    """For each prompt, `settings.samples_per_prompt` continuations (token ids, ending with a stop id when one was
    written; prompt + continuation at most `context` tokens), batched by `settings.batch_size` prompt-samples,
    longest prompts first."""
    was_training = model.training
    model.eval()
    jobs = [(i, k) for i in range(len(prompts)) for k in range(settings.samples_per_prompt)]
    jobs.sort(key=lambda job: -len(prompts[job[0]]))
    found: dict[tuple[int, int], list[int]] = {}
    for start in range(0, len(jobs), settings.batch_size):
        batch = jobs[start : start + settings.batch_size]
        generators = [torch.Generator(device=next(model.parameters()).device).manual_seed(
            _seed(settings.seed, prompts[i], k)) for i, k in batch]
        outs = _continue(model, [prompts[i] for i, _ in batch], generators, settings, set(stop_ids), pad_id, context)
        found.update(zip(batch, outs))
    model.train(was_training)
    return [[found[(i, k)] for k in range(settings.samples_per_prompt)] for i in range(len(prompts))]


def answered(prompt: list[int], response: list[int], source: str, *, origin: str, sample: int = 0) -> Example:
    """The prompt followed by `response`, whose tokens are the targets (written by `origin`)."""
    return Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response, source, origin=origin, sample=sample)


def with_responses(dataset: TokenDataset, responses: list[list[list[int]]], *, origin: str,
                   keep_data: bool = False) -> TokenDataset:
    """The examples' prompts with the generated responses as targets (one example per prompt and sample); with
    `keep_data`, each prompt's data example (where it has a response) comes first, then its samples."""
    examples = []
    for example, samples in zip(dataset, responses):
        prompt = prompt_of(example)
        if keep_data and len(prompt) < len(example.input_ids):
            examples.append(example)
        for k, response in enumerate(samples):
            if response:
                examples.append(answered(prompt, response, f"{example.source}#{origin}{k}", origin=origin, sample=k))
    what = f"the data's responses and the {origin}'s" if keep_data else f"responses by the {origin}"
    return TokenDataset(examples, f"{dataset.description}, {what}", dataset.template)


def generation_key(model_fingerprint: str, dataset: TokenDataset, settings: Sampling, context: int | None) -> str:
    """What decides a set of generations: the model's weights, the prompts, the sampling settings, the context."""
    prompts = [example_key(Example(prompt_of(ex), [], "")) for ex in dataset]
    text = json.dumps([model_fingerprint, prompts, settings.as_dict(), context], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_generations(model, model_fingerprint: str, dataset: TokenDataset, settings: Sampling, *, stop_ids,
                       pad_id: int, root: Path | None, context: int | None = None) -> list[list[list[int]]]:
    """`generate_responses` for the dataset's prompts, kept in `root/<key>.json` (the key: model weights, prompts
    and sampling settings) and read back from there by a later run; `root` None: not kept."""
    key = generation_key(model_fingerprint, dataset, settings, context)
    path = None if root is None else root / f"{key}.json"
    if path is not None and path.is_file():
        try:
            kept = json.loads(path.read_text())
            if kept.get("key") == key and len(kept["responses"]) == len(dataset):
                return kept["responses"]
        except (OSError, ValueError, KeyError):
            move_aside(path, "it is not a readable set of generations")
    responses = generate_responses(model, [prompt_of(ex) for ex in dataset], settings, stop_ids=stop_ids,
                                   pad_id=pad_id, context=context)
    if path is not None:
        try:
            write_text(path, json.dumps({"key": key, "settings": settings.as_dict(), "responses": responses}),
                       what="generations")
        except ValueError as err:
            warn(f"{err} The generations are used but not kept.")
    return responses


def generated_dataset(pair: ModelPair, dataset: TokenDataset, *, generate: str, settings: Sampling,
                      max_length: int | None = None, cache_dir: Path | None = None) -> TokenDataset:
    """`dataset` with, after each prompt's data example, `settings.samples_per_prompt` responses written by the
    pair's student or teacher (`generate`), kept under `cache_dir` (None: the kdviz cache). Under torchrun rank 0
    generates and the other ranks receive its responses."""
    if generate not in SOURCES:
        raise ValueError(f"generate must be one of {SOURCES}, got {generate!r}.")
    if pair.teacher is None:
        raise ValueError(f"Generated responses need the live teacher to score them: this pair reads the teacher from a "
                         f"top-k cache ({pair.teacher_name}), which holds it on the data's own tokens only. Load the "
                         "pair with the teacher model (--teacher MODEL) instead of --teacher-cache.")
    model = pair.student if generate == "student" else pair.teacher
    responses = None
    if distributed.world().is_main:
        root = (cache_dir if cache_dir is not None else cache_root()) / "generations"
        responses = cached_generations(model, fingerprint(model), dataset, settings,
                                       stop_ids=stop_ids(pair.tokenizer, dataset.template or "plain"),
                                       pad_id=pad_id(pair.tokenizer), root=root, context=pair.context(max_length))
    responses = distributed.broadcast(responses)
    return with_responses(dataset, responses, origin=generate, keep_data=True)
