"""Batched KV-cache generation for every decoder family: greedy, or temperature / top-p sampling.

Two jitted pieces run over one cache (`decoder.init_cache`): a prefill that writes the padded
prompts into the cache and returns each row's next-token logits (taken at its last real token, so
left and right padding both work), and a decode chunk that samples and feeds back
`chunk_size` tokens inside a `lax.scan`. Between chunks the host checks stop sequences: string
stops cannot be checked inside the jit (a stop like "Question:" has many tokenizations), so
rows are marked done on the host and generation ends once every row is done or the budget is
spent; the text is then cut at the first stop sequence, as lm-evaluation-harness does.

Shapes are bucketed (prompt length rounded up, cache length = prompt bucket + budget), so a
long evaluation compiles once per bucket rather than once per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int
from tqdm.auto import tqdm

from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked.

    Attributes:
      temperature: 0 for greedy (argmax); otherwise logits are divided by it before sampling.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
        (1.0 keeps every token). Ignored when greedy.
    """

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def bucket_length(n: int, minimum: int = 16) -> int:
    """Rounds n up to a coarse grid (steps of about an eighth of n, at least `minimum`).

    Padding stays under about 25% while the number of distinct compiled shapes grows only
    logarithmically with the longest input.
    """
    n = max(int(n), 1)
    step = max(minimum, 1 << max(n.bit_length() - 3, 0))
    return -(-n // step) * step


def _sample(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep a token while the mass before it is below top_p (so the top token always stays).
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        kept_BxV = mass_before_BxV < sampling.top_p
        threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _last_real_index(mask_BxT: jax.Array) -> jax.Array:
    index_T = jnp.arange(mask_BxT.shape[1])
    return jnp.max(jnp.where(mask_BxT > 0, index_T[None, :], 0), axis=-1)


@functools.partial(jax.jit, static_argnames=("spec", "quantizer", "cache_length", "packed_kernel"))
def _prefill(params, tokens_BxT, mask_BxT, spec, quantizer, cache_length, packed_kernel="auto"):
    dtype = params["embed"]["tokens"].dtype
    # A cache of exactly the prompt's length first (its attention then skips the causal half,
    # see decoder._attention), grown to its full length after.
    cache = decoder.init_cache(spec, tokens_BxT.shape[0], tokens_BxT.shape[1], dtype)
    h_BxTxD, cache = decoder.hidden_states(
        params,
        tokens_BxT,
        spec,
        mask_BxT=mask_BxT,
        quantizer=quantizer,
        cache=cache,
        packed_kernel=packed_kernel,
    )
    cache = decoder.grow_cache(cache, cache_length)
    last_B = _last_real_index(mask_BxT)
    h_BxD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    logits_BxV = decoder.unembed(params, h_BxD, spec).astype(jnp.float32)
    return logits_BxV, cache


@functools.partial(
    jax.jit,
    static_argnames=(
        "spec",
        "quantizer",
        "steps",
        "sampling",
        "eos_ids",
        "pad_id",
        "packed_kernel",
    ),
    donate_argnames=("cache",),
)
def _decode_chunk(
    params,
    cache,
    logits_BxV,
    done_B,
    rng,
    spec,
    quantizer,
    steps,
    sampling,
    eos_ids,
    pad_id,
    packed_kernel="auto",
):
    eos_E = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def step(carry, _):
        cache, logits_BxV, done_B, rng = carry
        rng, key = jax.random.split(rng)
        token_B = _sample(logits_BxV, key, sampling)
        token_B = jnp.where(done_B, pad_id, token_B)
        done_B = done_B | jnp.any(token_B[:, None] == eos_E[None, :], axis=-1)
        h_Bx1xD, cache = decoder.hidden_states(
            params,
            token_B[:, None],
            spec,
            quantizer=quantizer,
            cache=cache,
            packed_kernel=packed_kernel,
        )
        logits_BxV = decoder.unembed(params, h_Bx1xD[:, 0], spec).astype(jnp.float32)
        return (cache, logits_BxV, done_B, rng), token_B

    (cache, logits_BxV, done_B, rng), tokens_SxB = jax.lax.scan(
        step, (cache, logits_BxV, done_B, rng), None, length=steps
    )
    return tokens_SxB.T, cache, logits_BxV, done_B, rng


def generate_tokens(
    params: Params,
    spec: ModelSpec,
    tokens_BxT: Int[Array, "B T"] | np.ndarray,
    mask_BxT: Int[Array, "B T"] | np.ndarray | None = None,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    sampling: Sampling = GREEDY,
    rng: jax.Array | None = None,
    quantizer: Callable | None = None,
    chunk_size: int = 16,
    should_stop: Callable[[np.ndarray], np.ndarray] | None = None,
    packed_kernel: str = "auto",
) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after each (padded) prompt.

    Args:
      params: decoder parameters.
      spec: the architecture.
      tokens_BxT: prompts, padded on either side (or both); every row needs a real token.
      mask_BxT: 1 for real prompt tokens; all ones when None.
      max_new_tokens: the generation budget per row.
      eos_ids: token ids that end a row (the token itself is kept in the output).
      pad_id: written after a row has ended.
      sampling: greedy by default; see `Sampling`.
      rng: PRNG key for sampling (default key 0).
      quantizer: as in `decoder.forward`.
      chunk_size: tokens generated per jitted call between host-side stop checks.
      should_stop: optional host callback taking the tokens generated so far, (B, n), and
        returning a (B,) bool array of rows that are finished (e.g. hit a stop string).
      packed_kernel: the matmul of a packed model's layers (see `decoder.forward`).

    Returns:
      (B, max_new_tokens) int32 array; after a row ends (eos or should_stop) it holds pad_id,
      except the tokens of the chunk in which should_stop fired, which are left as generated.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokens_BxT = np.asarray(tokens_BxT, dtype=np.int32)
    mask_BxT = (
        np.ones_like(tokens_BxT) if mask_BxT is None else np.asarray(mask_BxT, dtype=np.int32)
    )
    if not mask_BxT.any(axis=1).all():
        raise ValueError("every prompt needs at least one real token")
    batch, length = tokens_BxT.shape
    chunk_size = max(1, min(chunk_size, max_new_tokens))
    chunks = -(-max_new_tokens // chunk_size)
    cache_length = length + chunks * chunk_size
    if spec.positional == "learned" and int(mask_BxT.sum(1).max()) + max_new_tokens > (
        spec.max_positions - spec.position_offset
    ):
        raise ValueError(
            f"prompt plus {max_new_tokens} new tokens exceeds the model's "
            f"{spec.max_positions - spec.position_offset} positions"
        )
    rng = jax.random.key(0) if rng is None else rng
    logits_BxV, cache = _prefill(
        params,
        jnp.asarray(tokens_BxT),
        jnp.asarray(mask_BxT),
        spec,
        quantizer,
        cache_length,
        packed_kernel,
    )
    done_B = jnp.zeros((batch,), bool)
    pieces: list[np.ndarray] = []
    eos = tuple(int(t) for t in eos_ids)
    for _ in range(chunks):
        new_BxC, cache, logits_BxV, done_B, rng = _decode_chunk(
            params,
            cache,
            logits_BxV,
            done_B,
            rng,
            spec,
            quantizer,
            chunk_size,
            sampling,
            eos,
            int(pad_id),
            packed_kernel,
        )
        pieces.append(np.asarray(new_BxC))
        finished = np.asarray(done_B)
        if should_stop is not None:
            stopped = np.asarray(should_stop(np.concatenate(pieces, axis=1)), dtype=bool)
            finished = finished | stopped
            done_B = jnp.asarray(finished)
        if finished.all():
            break
    out = np.concatenate(pieces, axis=1)[:, :max_new_tokens]
    if out.shape[1] < max_new_tokens:
        pad = np.full((batch, max_new_tokens - out.shape[1]), pad_id, dtype=out.dtype)
        out = np.concatenate([out, pad], axis=1)
    return out


def _decode_rows(tokenizer: Any, rows: np.ndarray) -> list[str]:
    """Each row's text with special tokens skipped; tokenizers without `batch_decode` (such as
    the byte tokenizer of random smoke-test models) are decoded row by row."""
    if hasattr(tokenizer, "batch_decode"):
        return tokenizer.batch_decode(rows.tolist(), skip_special_tokens=True)
    return [tokenizer.decode(row) for row in rows.tolist()]


def _cut(text: str, stop_sequences: Sequence[str]) -> str:
    for stop in stop_sequences:
        if stop:
            text = text.split(stop)[0]
    return text


def generate_text(
    params: Params,
    spec: ModelSpec,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    stop_sequences: Sequence[str] = (),
    batch_size: int = 8,
    max_length: int = 2048,
    sampling: Sampling = GREEDY,
    rng: jax.Array | None = None,
    quantizer: Callable | None = None,
    chunk_size: int = 16,
    progress: bool = False,
    packed_kernel: str = "auto",
) -> list[str]:
    """Generates a continuation of each prompt, cut at the first stop sequence.

    As lm-evaluation-harness's `generate_until` does: prompts are encoded without special tokens
    and left-truncated to `max_length - max_new_tokens` tokens, generation stops at the
    tokenizer's EOS token or once the decoded text holds a stop sequence, and the decoded text
    (special tokens skipped) is cut at each stop sequence in turn. Prompts are run longest
    first, left-padded to a bucketed length.

    Args:
      params: decoder parameters.
      spec: the architecture.
      tokenizer: a Hugging Face tokenizer.
      prompts: the contexts.
      max_new_tokens: the generation budget per prompt.
      stop_sequences: strings that end a continuation (not included in the result).
      batch_size: prompts per batch.
      max_length: the model's context length.
      sampling: greedy by default.
      rng: PRNG key for sampling.
      quantizer: as in `decoder.forward`.
      chunk_size: tokens per jitted call between stop checks.
      progress: show a progress bar.
      packed_kernel: the matmul of a packed model's layers (see `decoder.forward`).

    Returns:
      The continuations, in the order of `prompts`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_context = max(1, max_length - max_new_tokens)
    encoded = [
        tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_context:]
        for prompt in prompts
    ]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos_ids = () if eos_id is None else (int(eos_id),)
    pad_id = eos_ids[0] if eos_ids else 0
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    stops = tuple(s for s in stop_sequences if s)

    def stop_check(real_rows: int) -> Callable[[np.ndarray], np.ndarray]:
        def should_stop(generated_BxN: np.ndarray) -> np.ndarray:
            stopped = np.ones(len(generated_BxN), dtype=bool)  # filler rows never hold it up
            if stops:
                texts = _decode_rows(tokenizer, generated_BxN[:real_rows])
                stopped[:real_rows] = [any(stop in text for stop in stops) for text in texts]
            else:
                stopped[:real_rows] = False
            return stopped

        return should_stop

    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = bucket_length(max(len(encoded[i]) for i in rows))
        tokens = np.full((batch_size, length), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, length), dtype=np.int32)
        for r, i in enumerate(rows):
            ids = encoded[i] or [pad_id]
            tokens[r, length - len(ids) :] = ids
            mask[r, length - len(ids) :] = 1
        for r in range(len(rows), batch_size):  # Filler rows keep one compiled batch shape.
            tokens[r], mask[r] = tokens[0], mask[0]
        if rng is not None:
            rng, key = jax.random.split(rng)
        else:
            key = None
        generated = generate_tokens(
            params,
            spec,
            tokens,
            mask,
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
            pad_id=pad_id,
            sampling=sampling,
            rng=key,
            quantizer=quantizer,
            chunk_size=chunk_size,
            should_stop=stop_check(len(rows)),
            packed_kernel=packed_kernel,
        )
        texts = _decode_rows(tokenizer, generated[: len(rows)])
        for i, text in zip(rows, texts, strict=True):
            results[i] = _cut(text, stops)
        bar.update(len(rows))
    bar.close()
    return results
