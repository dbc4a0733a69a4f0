"""A stand-in for a teacher behind a vLLM server: canned top-k log-probs, no network, no vLLM.

``CannedTeacher`` answers ``get_sequence_logprobs`` — the call TRL's ``VLLMClient`` makes to a
teacher server — from a fixed random bigram table: the teacher's distribution at a position depends
only on the previous token, so the same request always gets the same answer and two training runs
see the same teacher. Its results have the server's layout: per completion position the top-k ids
and log-probs (sorted, padded with -inf / id 0), the actual token's log-prob (-inf when unknown).

Knobs for the awkward cases a real server produces: ``confident`` — previous tokens whose next-token
distribution is so peaked that its top-1 log-prob is exactly 0.0 in float32 (the tail bucket's clamp
is then active); ``short`` — previous tokens after which fewer than k candidates are reported.
"""

from __future__ import annotations

import numpy as np
import torch


class CannedTeacher:
    def __init__(self, vocab: int, *, seed: int = 7, scale: float = 2.0, confident=(), short=(), short_k: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64) * scale
        for token in confident:
            self.logits[token, (token * 7 + 3) % vocab] += 60.0
        self.short, self.short_k = set(short), short_k
        self.requests = []

    def distribution(self, previous: int, temperature: float) -> torch.Tensor:
        return torch.log_softmax(self.logits[previous] / temperature, -1).float()

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, **unused):
        self.requests.append((sequences, prompt_lengths, top_logprobs, temperature))
        out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            rows = {key: [] for key in out}
            for position in range(prompt_length, len(sequence)):
                logp = self.distribution(sequence[position - 1], temperature)
                k = self.short_k if sequence[position - 1] in self.short else top_logprobs
                values, ids = logp.topk(min(k, logp.numel()))
                pad = top_logprobs - values.numel()
                rows["logprobs"].append(values.tolist() + [float("-inf")] * pad)
                rows["logprob_token_ids"].append(ids.tolist() + [0] * pad)
                rows["actual_logprobs"].append([logp[sequence[position]].item()])
                rows["actual_token_ids"].append([sequence[position]])
            for key in out:
                out[key].append(rows[key])
        return out

    def candidates(self, sequence, start: int, top_k: int, temperature: float = 1.0):
        """What TRL's async rollout worker stores per position: [len, top_k + 1] ids (-1 padded) and
        log-probs (-inf padded), the top-k plus the actual token when it is outside them; positions
        before ``start`` (the prompt) are empty."""
        ids = np.full((len(sequence), top_k + 1), -1, dtype=np.int64)
        logprobs = np.full((len(sequence), top_k + 1), -np.inf, dtype=np.float32)
        for position in range(start, len(sequence)):
            logp = self.distribution(sequence[position - 1], temperature)
            k = self.short_k if sequence[position - 1] in self.short else top_k
            values, top = logp.topk(min(k, logp.numel()))
            row_ids, row_logprobs = top.tolist(), values.tolist()
            if sequence[position] not in row_ids:
                row_ids.append(sequence[position])
                row_logprobs.append(logp[sequence[position]].item())
            ids[position, :len(row_ids)] = row_ids
            logprobs[position, :len(row_logprobs)] = row_logprobs
        return ids, logprobs
