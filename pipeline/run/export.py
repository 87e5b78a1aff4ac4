"""A round's preference data for other trainers, tokenised exactly as dice scored it (`dice export`).

dice scores a pair on its token ids: a generated response as it was sampled, an offline one as [chat template of the
prompt, with the generation prompt] + [response tokens + EOS, unless the response already ends with EOS]
(`pipeline.compute.logprobs.encode`); both are stored in reference.parquet. TRL's DPOTrainer (1.16) tokenises a
*standard* example as
    prompt_ids = tokenizer(prompt), prompt+chosen = tokenizer(prompt + chosen (+ eos_token unless chosen ends with it)),
and takes the completion after their common prefix; its collator then cuts every sequence at DPOConfig.max_length
(1024 unless set), so a trainer must be given the run's model.max_length, which `export_round` returns. So the export writes `prompt` as the chat template rendered to
text (without a leading BOS string when the tokenizer adds BOS itself), `chosen`/`rejected` as the response texts,
and checks, pair by pair, that those calls give exactly the token ids dice scored; a pair that would not (a
sampled response whose text tokenises to other ids, or a tokenizer that merges tokens across the prompt/response
boundary) is an error naming it and why, never a silent mismatch. TRL's
*conversational* format would not match: chat templates that put text after EOS (Zephyr's newline) make TRL
train on tokens dice never scored.

dice's reference log-probs go along as `dice_ref_chosen_logps` / `dice_ref_rejected_logps`: TRL 1.16 computes its
own with `precompute_ref_log_probs` (and would refuse columns named like its own), so they are there to compare
or to feed a trainer that reads supplied ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import schemas
from pipeline.data.artifacts import MANIFEST_DIR, ArtifactError, read_manifest, read_parquet
from pipeline.data.chat import as_messages, prompts_of

Format = Literal["trl", "jsonl", "hf"]
EXPORT_COLUMNS = ["prompt", "chosen", "rejected", "dice_ref_chosen_logps", "dice_ref_rejected_logps", "pair_id",
                  "prompt_id", "source", "preference", "round", "prompt_messages"]  # fmt: skip


def trl_prompt(tokenizer, prompt, ids: list[int]) -> str | None:
    """The prompt text on which `tokenizer(text)` (special tokens added, as TRL calls it) gives exactly `ids`."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    candidates = [text]
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):  # the tokenizer adds BOS itself: the template's would come twice
        candidates.append(text[len(bos):])
    for c in candidates:
        if tokenizer(c)["input_ids"] == ids:
            return c
    return None


def trl_completion(response: str, eos: str) -> str:
    """The completion text TRL tokenises after the prompt: the response with EOS appended unless it ends with it."""
    return response if response.endswith(eos) else response + eos


def reference_model(run_dir: Path, record: dict[str, str]) -> str:
    """The model a round's reference stage scored with, from its manifest's input record: inside the run folder it
    is found relative to the run (`in_run`), so a run exported from another folder, or moved, still finds it; a
    relative path outside the run where it pointed when the run recorded it (`abs_path`)."""
    if "in_run" in record:
        return str(Path(run_dir) / record["in_run"])
    path = record["path"]
    if not Path(path).exists() and Path(record.get("abs_path", path)).exists():
        return record["abs_path"]  # a relative path outside the run, from the folder the run started in
    parts = Path(path).parts
    if not Path(path).exists() and len(parts) >= 2 and parts[-2].startswith("round-"):
        # a manifest written before `in_run` was recorded, naming a checkpoint relative to where the run started
        candidate = Path(run_dir) / parts[-2] / parts[-1]
        if candidate.exists():
            return str(candidate)
    return path


def trl_rows(reference: pa.Table, tokenizer) -> tuple[list[dict[str, Any]], list[str]]:
    """Export rows of a REFERENCE table and the pairs whose tokens TRL would not reproduce (pair_id: why)."""
    from pipeline.compute.logprobs import encode, encode_rows, stored_ids

    ids_columns = [c for c in ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids") if c in reference.column_names]
    d = reference.drop_columns(ids_columns).to_pydict()
    prompts = prompts_of(reference)
    n = len(prompts)
    p_all, c_all, r_all = (stored_ids(reference[c]) if c in ids_columns else [None] * n
                           for c in ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids"))  # fmt: skip
    # the tokens dice scored: the stored ids (generated pairs: as sampled), the texts' for a file without them
    scored = encode_rows(tokenizer, prompts * 2, d["chosen"] + d["rejected"], p_all * 2, c_all + r_all)
    rows, bad = [], []
    eos = tokenizer.eos_token
    for i, prompt in enumerate(prompts):
        (p_ids, c_ids), (_, r_ids) = scored[i], scored[n + i]
        p_ids, c_ids, r_ids = (list(map(int, x)) for x in (p_ids, c_ids, r_ids))
        text = trl_prompt(tokenizer, prompt, p_ids)
        if text is None:
            bad.append(f"{d['pair_id'][i]}: the rendered prompt does not tokenise to dice's prompt tokens")
            continue
        sides = ((d["chosen"][i], c_ids), (d["rejected"][i], r_ids))
        if not all(tokenizer(text + trl_completion(y, eos))["input_ids"] == p_ids + ids for y, ids in sides):
            # TRL tokenises text: a response sampled as tokens its text does not tokenise back to cannot be exported
            if any(encode(tokenizer, prompt, y)[1] != ids for y, ids in sides):
                bad.append(f"{d['pair_id'][i]}: dice scored the sampled token ids, and the response's text "
                           "tokenises to other ids (TRL would train on those)")  # fmt: skip
            else:
                bad.append(f"{d['pair_id'][i]}: prompt + response tokenise differently together than apart")
            continue
        rows.append({
            "prompt": text, "chosen": d["chosen"][i], "rejected": d["rejected"][i],
            "dice_ref_chosen_logps": d["ref_chosen_logps"][i], "dice_ref_rejected_logps": d["ref_rejected_logps"][i],
            "pair_id": d["pair_id"][i], "prompt_id": d["prompt_id"][i], "source": d["source"][i],
            "preference": d["preference"][i], "round": d["round"][i], "prompt_messages": d["prompt_messages"][i],
        })  # fmt: skip
    return rows, bad


def export_round(run_dir: str | Path, k: int, fmt: Format, out: str | Path, skip_inexact: bool = False) -> dict[str, Any]:
    """Write round k's training pairs (reference.parquet) as `fmt` at `out`; returns what was written, with the
    run's `max_length` (the reference stage dropped longer pairs; give it to TRL's DPOConfig, whose default of 1024
    would cut longer ones).

    trl: one Parquet file (`load_dataset("parquet", data_files=out)`); jsonl: one JSON-lines file; hf: a
    `datasets.save_to_disk` folder. All three hold the same columns (EXPORT_COLUMNS).

    skip_inexact: leave out the pairs whose tokens would differ in TRL (counted in `skipped`, the first named in
    `skipped_first`) instead of failing.

    Raises:
        ArtifactError: the round has no reference.parquet, or a pair's tokens would differ in TRL (without
            skip_inexact; or every pair would).
    """
    from transformers import AutoTokenizer

    from pipeline.data.models import local_model

    rd = Path(run_dir) / f"round-{k}"
    manifest = read_manifest(rd / MANIFEST_DIR / "reference.json")
    if manifest is None:
        raise ArtifactError(f"{rd}: the reference stage has not finished (no {MANIFEST_DIR}/reference.json)")
    model = reference_model(Path(run_dir), manifest["inputs"]["reference"])  # the model (and tokenizer) that scored them
    table = read_parquet(rd / "reference.parquet", schemas.REFERENCE)
    tokenizer = AutoTokenizer.from_pretrained(local_model(model))
    rows, bad = trl_rows(table, tokenizer)
    if bad and (not skip_inexact or not rows):
        raise ArtifactError(
            f"{rd / 'reference.parquet'}: {len(bad)} of {table.num_rows} pairs would be tokenised differently by "
            f"TRL than dice scored them with {model}'s tokenizer; first: " + "; ".join(bad[:3])
            + ("" if skip_inexact else " (--skip-inexact exports the others)")
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = [schemas.REFERENCE.field(c) if c in schemas.REFERENCE.names else None for c in EXPORT_COLUMNS]
    schema = pa.schema([f if f is not None else pa.field(c, pa.float64() if "logps" in c else pa.string())
                        for c, f in zip(EXPORT_COLUMNS, fields)])  # fmt: skip
    exported = pa.Table.from_pylist(rows, schema=schema)
    if fmt == "trl":
        pq.write_table(exported, out)
    elif fmt == "jsonl":
        import json

        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt == "hf":
        from datasets import Dataset

        Dataset(exported).save_to_disk(str(out))
    else:
        raise ValueError(f"--format {fmt!r}: choose trl, jsonl or hf")
    return {"rows": len(rows), "model": model, "format": fmt, "out": str(out), "skipped": len(bad),
            "skipped_first": bad[:3], "max_length": manifest.get("config", {}).get("max_length")}  # fmt: skip
