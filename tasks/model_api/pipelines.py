"""Pipelines the installed transformers may not have: question answering and sequence-to-sequence.

transformers 5 dropped the `question-answering`, `summarization` and `text2text-generation` pipelines
(4.x had them); users still deploy SQuAD-style readers and T5/BART models. These small classes take a
batch the way the transformers pipelines do (`pipe(inputs, batch_size=..., **params)`) and expose
`model`/`tokenizer`, so the task table, the batcher and /info treat them like any other pipeline, and a
deployment behaves the same on every transformers version the project allows.
"""

from __future__ import annotations

from typing import Any


class Seq2SeqPipeline:
    """Encoder-decoder generation: tokenize a padded batch, `generate`, decode; `key` names the output field."""

    def __init__(self, model: Any, tokenizer: Any, key: str = "generated_text", max_input_tokens: int = 512):
        self.model, self.tokenizer, self.key, self.max_input_tokens = model, tokenizer, key, max_input_tokens

    def __call__(self, texts: list[str], batch_size: int | None = None, truncation: bool = True, **gen: Any) -> list:
        import torch

        enc = self.tokenizer(
            texts, padding=True, truncation=truncation, max_length=self.max_input_tokens, return_tensors="pt"
        ).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen)
        return [{self.key: t} for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class QuestionAnsweringPipeline:
    """Extractive QA: the best context span by start/end logits (start <= end, at most max_answer_len tokens,
    inside the context), scored as the product of the start and end probabilities, as the 4.x pipeline did."""

    def __init__(self, model: Any, tokenizer: Any, max_input_tokens: int = 512):
        self.model, self.tokenizer, self.max_input_tokens = model, tokenizer, max_input_tokens

    def __call__(
        self,
        question: list[str],
        context: list[str],
        batch_size: int | None = None,
        top_k: int = 1,
        max_answer_len: int = 15,
        handle_impossible_answer: bool = False,
    ) -> list[Any]:
        import torch

        enc = self.tokenizer(
            question,
            context,
            padding=True,
            truncation="only_second",
            max_length=self.max_input_tokens,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")
        seq_ids = [enc.sequence_ids(i) for i in range(len(question))]
        enc = enc.to(self.model.device)
        with torch.inference_mode():
            out = self.model(**enc)
        starts = out.start_logits.float().softmax(-1).cpu()
        ends = out.end_logits.float().softmax(-1).cpu()
        results = []
        for i, ctx in enumerate(context):
            in_ctx = torch.tensor([s == 1 for s in seq_ids[i]])
            s, e = starts[i] * in_ctx, ends[i] * in_ctx
            scores = torch.triu(s[:, None] * e[None, :])  # start <= end
            scores = torch.tril(scores, diagonal=max_answer_len - 1)  # at most max_answer_len tokens
            flat = scores.flatten()
            k = min(top_k, int((flat > 0).sum()) or 1)
            best = torch.topk(flat, k)
            answers = []
            for score, idx in zip(best.values.tolist(), best.indices.tolist()):
                a, b = divmod(idx, scores.shape[1])
                c0, c1 = int(offsets[i][a][0]), int(offsets[i][b][1])
                answers.append({"answer": ctx[c0:c1], "score": float(score), "start": c0, "end": c1})
            if handle_impossible_answer:
                null = float(starts[i][0] * ends[i][0])
                if not answers or null > answers[0]["score"]:
                    answers.insert(0, {"answer": "", "score": null, "start": 0, "end": 0})
                answers = answers[:top_k]
            results.append(answers[0] if top_k == 1 else answers)
        return results
