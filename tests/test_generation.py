"""Generated responses: greedy equals `model.generate(do_sample=False)`; sampling is reproducible on any batch size."""

import pytest
import torch

from kdviz import zoo
from kdviz.generation import Sampling, generate_responses

PROMPTS = [[5, 17, 3, 99, 42], [7, 8], [300, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3]]


@pytest.fixture(scope="module")
def model():
    return zoo.load("zoo:student")


def test_greedy_equals_generate(model):
    model, tokenizer = model
    ours = generate_responses(model, PROMPTS, Sampling(max_new_tokens=12, temperature=0.0, batch_size=3),
                              stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    for prompt, (response,) in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert response == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_is_reproducible_on_any_batch_size(model, temperature, top_p):
    model, tokenizer = model
    runs = [generate_responses(model, PROMPTS, Sampling(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                        samples_per_prompt=3, seed=4, batch_size=size),
                               stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
            for size in (1, 5, 12)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(sample) for samples in runs[0] for sample in samples}) > len(PROMPTS)  # samples differ
    other = generate_responses(model, PROMPTS, Sampling(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                        samples_per_prompt=3, seed=5),
                               stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    assert other != runs[0]


def test_sampling_settings_are_checked():
    for options, says in (({"top_p": 0}, "top_p must be"), ({"max_new_tokens": 0}, "max_new_tokens must be"),
                          ({"temperature": -1.0}, "sample temperature must be"),
                          ({"temperature": 0.0, "samples_per_prompt": 2}, "greedy decoding writes one")):
        with pytest.raises(ValueError, match=says):
            Sampling(**options)
