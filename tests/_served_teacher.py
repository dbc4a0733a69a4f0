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

import queue

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


class RolloutWorker:
    """TRL's async rollout-worker protocol fed from a :class:`CannedTeacher`: deterministic rollouts (random
    completions of the dataset's prompts) with the candidates TRL's worker would store, ``per_sync`` of
    them queued at the start and at each weight sync."""

    def __init__(self, tokenizer, rows, teacher, top_k, temperature, per_sync):
        self.rollout_buffer, self.metrics_queue = queue.Queue(), queue.Queue()
        self.tokenizer, self.rows, self.teacher, self.top_k = tokenizer, rows, teacher, top_k
        self.temperature, self.per_sync, self.count = temperature, per_sync, 0

    def _fill(self):
        from trl.experimental.async_distillation.async_rollout_worker import RolloutSample

        for _ in range(self.per_sync):
            row = self.rows[self.count % len(self.rows)]
            generator = torch.Generator().manual_seed(self.count)
            prompt = list(self.tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                             return_dict=False))
            completion = torch.randint(3, len(self.tokenizer), (2 + self.count % 5,), generator=generator).tolist()
            sequence = prompt + completion
            ids, logprobs = self.teacher.candidates(sequence, len(prompt), self.top_k, self.temperature)
            self.rollout_buffer.put(RolloutSample(
                prompt=row["prompt"], completion=None, input_ids=np.array(sequence),
                completion_mask=np.array([0] * len(prompt) + [1] * len(completion)), teacher_topk_ids=ids,
                teacher_topk_logprobs=logprobs, model_version=0, teacher_id="default", prompt_id=self.count,
                metrics={}))
            self.count += 1

    def start(self):
        self._fill()

    def update_model_version(self, version):
        self._fill()

    def stop(self):
        pass

    def check_health(self, stale_after_s):
        pass


class WeightTransfer:
    """TRL's weight-transfer protocol, doing nothing (there is no student vLLM server)."""
    def init_weight_transfer(self):
        pass

    def pause(self):
        pass

    def send_weights(self, iterator):
        for _ in iterator:
            pass

    def resume(self):
        pass

    def destroy(self):
        pass
