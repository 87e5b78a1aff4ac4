"""Every Parquet table dice writes, declared in one place.

Column names follow the conventions other preference trainers read: `prompt`/`chosen`/`rejected` for
pairs and TRL's `ref_chosen_logps`/`ref_rejected_logps` for precomputed reference log-probs. The prompt a model
saw is `prompt_messages` (a conversation, TRL's conversational format) when it is more than one user turn, else
`prompt` itself (pipeline/data/chat.py); `prompt` is always its readable text. To hand a round to another trainer
with the exact tokens dice scored, use `dice export` (README, Exporting rounds). The tokens themselves travel as
`*_token_ids` (list<int32>): generate stores what the engine received and sampled, and every later stage scores and
trains on those ids, never on the text tokenised again. Strings are plain `string` (not large/dictionary) and the
nested types are the list of {role, content} structs of `prompt_messages` and the lists of token ids, so pandas,
polars, duckdb and `datasets` all open the files unchanged.
"""

from __future__ import annotations

import pyarrow as pa

# A conversation: TRL's conversational format, [{role, content}, ...]
MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))
# Token ids: a sequence of one model's tokenizer.
TOKEN_IDS = pa.list_(pa.int32())
# Columns added after files of earlier versions were written: read as nulls when absent (resume keeps working: a
# row without token ids is tokenised from its text, as before ids were stored).
OPTIONAL = {"prompt_messages": MESSAGES, "prompt_token_ids": TOKEN_IDS, "response_token_ids": TOKEN_IDS,
            "chosen_token_ids": TOKEN_IDS, "rejected_token_ids": TOKEN_IDS}

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the text (a conversation rendered: pipeline/data/chat.py)
        pa.field("prompt_messages", MESSAGES),  # the conversation, null for one user turn
    ]
)

OFFLINE = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the text (a conversation rendered: pipeline/data/chat.py)
        pa.field("prompt_messages", MESSAGES),  # the conversation, null for one user turn
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
    ]
)

RESPONSES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the text (a conversation rendered: pipeline/data/chat.py)
        pa.field("prompt_messages", MESSAGES),  # the conversation, null for one user turn
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),  # generated tokens, EOS included when emitted
        pa.field("num_chars", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS/stop string) or "length"
        # the mixture sampler's sum of sampled-token log-probs; null from vLLM (asking it costs a Python object per
        # token, and labels.parquet's policy_logp is that sum over the same ids)
        pa.field("cumulative_logprob", pa.float64()),
        pa.field("seed", pa.int64(), nullable=False),  # the prompt's sampling seed
        pa.field("model", pa.string(), nullable=False),  # the policy that generated it
        pa.field("round", pa.int32(), nullable=False),
        # what the engine received and sampled, scored and trained on as they are (the text is for people):
        pa.field("prompt_token_ids", TOKEN_IDS),  # the prompt under the policy's chat template, as the engine got it
        pa.field("response_token_ids", TOKEN_IDS),  # the sampled tokens, EOS included when sampled (num_tokens of them)
    ]
)

# Labels keep every response column, so one file answers "what was sampled and how was it scored".
LABELS = pa.schema(
    list(RESPONSES)
    + [
        pa.field("policy_logp", pa.float64()),  # logp(π_{k-1}, x, y), summed over response tokens
        pa.field("reference_logp", pa.float64()),  # logp(π_{k-2}, x, y)
        pa.field("reward", pa.float64()),  # the label: null when the response could not be scored
        pa.field("labeller", pa.string(), nullable=False),
        pa.field("label_error", pa.string()),  # why reward is null (e.g. "too_long")
    ]
)
# With labeller=judge, `reward` is the response's ranking score (label.ranking) from the comparisons below, and
# the log-prob columns are null. With labeller=reward_model, `reward` is the reward model's score r.

# One row per (prompt, unordered response pair, annotator) that a judge labeller asked: the raw values each
# annotator gave, so p̂ = mean of `p` over a pair's annotators (failed rows excluded) can be recomputed.
# Written by the label stage as `preferences.parquet` (empty for scalar labellers).
PREFERENCES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("idx_a", pa.int32(), nullable=False),  # sample_idx of response a (shown first in order ab)
        pa.field("idx_b", pa.int32(), nullable=False),  # sample_idx of response b; idx_a < idx_b
        pa.field("annotator", pa.string(), nullable=False),  # label.judges[i].id (or judge-<i>)
        pa.field("p_ab", pa.float64()),  # P(a ≻ b) with a shown first: softmax([ℓ_A, ℓ_B])[0]
        pa.field("p_ba", pa.float64()),  # P(b ≻ a) with b shown first
        pa.field("p", pa.float64()),  # ½(p_ab + 1 − p_ba): position bias cancelled; null when an order failed
        pa.field("error", pa.string()),  # null, or why p is null: timeout, http_<code>, unparseable, ...
        pa.field("error_detail", pa.string()),  # a short message for `error` (never secrets)
        pa.field("attempts", pa.int32(), nullable=False),  # requests sent for both orders, retries included
        pa.field("round", pa.int32(), nullable=False),
    ]
)

PAIRS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the text (a conversation rendered: pipeline/data/chat.py)
        pa.field("prompt_messages", MESSAGES),  # the conversation, null for one user turn
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "generated" or "offline"
        pa.field("chosen_reward", pa.float64()),  # null for offline pairs
        pa.field("rejected_reward", pa.float64()),
        pa.field("chosen_len", pa.int32()),  # in pairs.length_unit; null for offline pairs
        pa.field("rejected_len", pa.int32()),
        pa.field("alpha", pa.float64()),  # the round's length-debiasing α; null for offline pairs
        # P(chosen ≻ rejected | prompt) and how many annotators it averages: 1.0 and 1 for hard labels
        # (best-vs-worst, offline pairs); soft labellers write their empirical preference here.
        pa.field("preference", pa.float64(), nullable=False),
        pa.field("annotators", pa.int32(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        # the tokens scored and trained on: generated pairs' as sampled (responses.parquet); null for offline pairs
        # here, which the reference stage tokenises once (every row of reference.parquet has them)
        pa.field("prompt_token_ids", TOKEN_IDS),
        pa.field("chosen_token_ids", TOKEN_IDS),  # response tokens, EOS included (appended to offline texts)
        pa.field("rejected_token_ids", TOKEN_IDS),
    ]
)

REFERENCE = pa.schema(
    list(PAIRS)
    + [
        pa.field("chosen_tokens", pa.int32(), nullable=False),  # response tokens scored, EOS included
        pa.field("rejected_tokens", pa.int32(), nullable=False),
        pa.field("ref_chosen_logps", pa.float64(), nullable=False),
        pa.field("ref_rejected_logps", pa.float64(), nullable=False),
    ]
)

TRAIN_METRICS = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("epoch", pa.float64(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("chosen_reward", pa.float64(), nullable=False),  # mean β·(logp_θ − logp_ref) of chosen
        pa.field("rejected_reward", pa.float64(), nullable=False),
        pa.field("margin", pa.float64(), nullable=False),
        pa.field("accuracy", pa.float64(), nullable=False),  # share of pairs with chosen_reward > rejected_reward
        pa.field("grad_norm", pa.float64()),
        pa.field("learning_rate", pa.float64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),  # non-padding tokens in the step, all processes
        pa.field("tokens_per_s", pa.float64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
    ]
)

# One row per held-out prompt × sample that the evaluate stage compared: the policy π_k's response and the
# baseline's response to the same prompt drawn with the same seed (a reference-outputs file: its one output),
# their lengths, each annotator's P(policy ≻ baseline) and the mean p̂ the metrics use. Written as `eval.parquet`
# (stages/evaluate.py). `eval_schema(ids)` appends two columns per annotator, in config order:
#   p_<id>      float64  that annotator's P(policy ≻ baseline), position bias cancelled; null when it failed
#   error_<id>  string   null, or why it failed: timeout, http_<code>, python_error, non_finite, too_long, ...
EVAL = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),  # the policy's sample; compared with the baseline's same one
        pa.field("response", pa.string(), nullable=False),  # the policy's
        pa.field("baseline_response", pa.string(), nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),  # response tokens under the policy's tokenizer (no special tokens)
        pa.field("baseline_tokens", pa.int32(), nullable=False),  # the same count, same tokenizer
        pa.field("chars", pa.int32(), nullable=False),
        pa.field("baseline_chars", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" or "length" (cut at eval.max_tokens)
        pa.field("baseline_finish_reason", pa.string()),  # null for a reference-outputs file
        pa.field("seed", pa.int64(), nullable=False),  # the prompt's sampling seed, the same for both sides
        pa.field("p", pa.float64()),  # p̂: mean of the annotators' p; null below eval.min_annotators (excluded)
        pa.field("annotators", pa.int32(), nullable=False),  # annotators that answered this row
        pa.field("metric", pa.float64()),  # eval.python_metric of the policy's response (null without one)
        pa.field("baseline_metric", pa.float64()),
        pa.field("reward", pa.float64()),  # eval.reward_model's score of the policy's response (null without one)
        pa.field("baseline_reward", pa.float64()),
        pa.field("model", pa.string(), nullable=False),  # the policy evaluated
        pa.field("baseline", pa.string(), nullable=False),  # the baseline model, or the reference-outputs file
        pa.field("round", pa.int32()),  # the round of π_k; null for a standalone `dice eval --model`
    ]
)


# The evaluate stage's control rows (`eval_controls.parquet`): one side's sample a against its own sample b of the same
# prompt, judged like the policy rows. Equal in quality in expectation, they show the judges' length preference alone
# and carry the length term of the LC fit (pipeline/method/evaluation.py).
EVAL_CONTROLS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),  # "policy" or "baseline": whose two samples are compared
        pa.field("sample_a", pa.int32(), nullable=False),
        pa.field("sample_b", pa.int32(), nullable=False),
        pa.field("tokens_a", pa.int32(), nullable=False),
        pa.field("tokens_b", pa.int32(), nullable=False),
        pa.field("chars_a", pa.int32(), nullable=False),
        pa.field("chars_b", pa.int32(), nullable=False),
        pa.field("p", pa.float64()),  # mean P(a ≻ b) over the annotators; null below eval.min_annotators
        pa.field("annotators", pa.int32(), nullable=False),
        pa.field("round", pa.int32()),
    ]
)


def eval_schema(annotator_ids: list[str], base: pa.Schema = EVAL) -> pa.Schema:
    """EVAL (or EVAL_CONTROLS) plus `p_<id>` and `error_<id>` for each annotator, in order (eval.annotator_ids())."""
    extra = []
    for a in annotator_ids:
        extra += [pa.field(f"p_{a}", pa.float64()), pa.field(f"error_{a}", pa.string())]
    return pa.schema(list(base) + extra)
