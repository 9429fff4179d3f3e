"""Generation quality by (method, prefix length) (DESIGN.md protocol).

For each held-out document with at least N + T tokens: greedy-generate T (default 100) tokens after its first N
tokens under the method (`generation.generate`, the one path every method shares), decode the generated and the
true next T tokens, and score BLEU (sacrebleu, corpus level over the documents of the cell, plus the mean sentence
BLEU) and ROUGE-L F1 (rouge-score, mean over documents). Records keep scores only, never text (book text must not
land in the repository).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lengthwise.data.corpus import Document, documents_of_length
from lengthwise.errors import UserError
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.tasks import check_lengths, check_specs, resolve_spec
from lengthwise.generation import generate
from lengthwise.models.families import model_info
from lengthwise.progress import progress_bar
from lengthwise.registry import get_entry, parse_method_spec


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU, mean sentence BLEU and mean ROUGE-L F1 (0-100 scale for BLEU, 0-1 for ROUGE-L)."""
    import sacrebleu  # noqa: PLC0415
    from rouge_score import rouge_scorer  # noqa: PLC0415

    if len(hypotheses) != len(references) or not hypotheses:
        raise UserError(f"need as many hypotheses as references (>= 1), got {len(hypotheses)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    sentence = [sacrebleu.sentence_bleu(hyp, [ref]).score for hyp, ref in zip(hypotheses, references)]
    return {
        "bleu": round(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score, 3),
        "sentence_bleu": round(sum(sentence) / len(sentence), 3),
        "rougeL": round(sum(rouge) / len(rouge), 4),
        "per_doc": {"sentence_bleu": [round(v, 3) for v in sentence], "rougeL": [round(v, 4) for v in rouge]},
    }


def gen_quality(
    model,
    tokenizer,
    documents: Sequence[Document],
    prefix_lengths: Sequence[int],
    methods: Sequence[str] = ("vanilla",),
    *,
    new_tokens: int = 100,
    max_docs: int = 4,
    results: ResultsFile | None = None,
    model_name: str = "model",
    data_name: str = "data",
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """BLEU / ROUGE-L of `new_tokens` greedy tokens after N-token prefixes, for every (method, N) cell.

    `{s}` in a method spec becomes (N + new_tokens) / L_pretrain. The same documents (the first `max_docs` with at
    least N + new_tokens tokens, corpus order) serve every method at a given N; shorter ones are skipped and counted.
    """
    check_specs(methods)
    check_lengths(prefix_lengths, 1, "prefix length")
    if new_tokens < 1:
        raise UserError(f"new_tokens must be >= 1, got {new_tokens}")
    if not documents:
        raise UserError(f"corpus {data_name!r} holds no documents")
    results = results or ResultsFile(None)
    info = model_info(model)
    tokenized = {n: documents_of_length(documents, tokenizer, n + new_tokens, max_docs) for n in prefix_lengths}
    for n, tok in tokenized.items():
        if not tok.docs:
            raise UserError(
                f"no document of {data_name!r} has {n} + {new_tokens} tokens ({tok.skipped} shorter ones skipped); "
                "use shorter prefixes or longer documents"
            )
    cells = [(m, n) for n in prefix_lengths for m in methods]  # short prefixes first, every method
    records = []
    with progress_bar(progress) as bar:
        task = bar.add_task("gen-quality", total=sum(len(tokenized[n].docs) for _, n in cells))
        for method, n in cells:
            key = cell_key("gen-quality", model=model_name, method=method, data=data_name, length=n, docs=max_docs,
                           new_tokens=new_tokens, seed=seed)
            done = results.done(key)
            if done:
                records.append(done)
                bar.advance(task, len(tokenized[n].docs))
                continue
            spec = resolve_spec(method, n + new_tokens, info.pretrain_length)
            bar.update(task, description=f"gen-quality {spec} @ {n}")
            hypotheses, references, agree = [], [], []
            for _, ids in tokenized[n].docs:
                prefix, truth = ids[:n], ids[n : n + new_tokens]
                new = generate(model, torch.tensor([prefix]), spec, max_new_tokens=new_tokens).tolist()
                hypotheses.append(tokenizer.decode(new))
                references.append(tokenizer.decode(truth))
                agree.append(sum(int(a == b) for a, b in zip(new, truth)) / new_tokens)
                bar.advance(task)
            scores = text_scores(hypotheses, references)
            per_doc = scores.pop("per_doc")
            per_doc["token_match"] = [round(v, 4) for v in agree]
            metrics = {**scores, "token_match": round(sum(agree) / len(agree), 4), "docs": len(hypotheses),
                       "skipped": tokenized[n].skipped}
            record = make_record("gen-quality", key, model=model_name, method=method, method_config=_describe(spec),
                                 data=data_name, seed=seed, metrics=metrics, length=n, new_tokens=new_tokens,
                                 method_resolved=spec, pretrain_length=info.pretrain_length,
                                 doc_names=[name for name, _ in tokenized[n].docs], per_doc=per_doc)
            results.append(record)
            records.append(record)
    return records


def _describe(spec: str) -> list[dict]:
    """The resolved config of every method in `spec` (defaults filled in), as `PatchHandle.describe()` gives it."""
    from dataclasses import asdict  # noqa: PLC0415

    return [{"method": name, **asdict(get_entry(name).make_config(**options))}
            for name, options in parse_method_spec(spec)]
