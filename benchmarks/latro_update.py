r"""One LaTRO update, latro_jax against the PyTorch way, side by side on the same weights.

    python benchmarks/latro_update.py                  # the bench shape (below), 3 rounds
    python benchmarks/latro_update.py --paper          # K = 16, 128-token prompts (GSM8K chat prompts)
    python benchmarks/latro_update.py --questions=4 --samples=4 --rationale_tokens=32   # any shape
    python benchmarks/latro_update.py --layers=16      # a model with twice the layers

Both sides load the same randomly initialised Llama from one HF folder (bench shape: hidden
512, 8 layers, 8 heads, 2 KV heads, intermediate 1408, vocab 8192) and run the same update
(SPEC 1.2) on N questions x K rationales: random P-token prompts, L rationale tokens sampled at
T = 1 with no stop (every rationale runs to L, so both sample exactly the same number of
tokens), A-token answers; rewards log pi(y|x+z) - beta (log pi(z|x) - log pi_0(z|x)) with the
non-stop penalty, RLOO advantages, the loss mean(-A log pi(z|x) - c_sft log pi(y|x+z)), one AdamW
step, float32.

- latro_jax: `Latro.sample` -> `Latro.score` -> `Learner.apply` (the job's own update, timed as
  the Learner times it: sample / score / step).
- PyTorch (written here with transformers + torch, as the released code does it): HF `generate`
  for the rationales, no-grad forward passes of the policy (log pi(z|x) and log pi(y|x+z) from
  one pass) and of the reference, one forward + backward with grad, `torch.optim.AdamW`.

The two run alternately, one warm-up update each (compilation), then --rounds measured updates
each; every measurement is one JSON line: {"impl", "round", "sample_s", "score_s", "step_s",
"total_s"} (torch's lines add "ratio": its total over latro_jax's in the same round), and a
last line gives the medians, the median ratio torch / latro_jax and the process's peak RSS
(latro_jax's alone with --skip_torch).

Like the job (`python -m latro_jax.main`), the script first re-executes itself with glibc's malloc on
transparent huge pages (latro_jax/huge_pages.py; the summary's "glibc_tunables" records it; both
implementations share the process, so both run with it). `GLIBC_TUNABLES= python ...` opts out.

latro_jax's score is the reference pass alone: the policy's log pi(z|x) and log pi(y|x+z) come
from the sampler (`latro.reuse_sampler_logprobs`, on by default; --noreuse_sampler_logprobs runs
the policy scoring pass as before), and the reference pass and the step run each question's
prompt once for its K rows (`latro.share_prompts`; --noshare_prompts: once per row).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench_model import MODEL, make_model  # noqa: E402  (benchmarks/ is the script's folder)

FLAGS = flags.FLAGS
flags.DEFINE_bool("paper", False, "The paper's shape: K = 16 rationales, 128-token prompts (overrides those flags).")
flags.DEFINE_integer("questions", 8, "N, questions per update.")
flags.DEFINE_integer("samples", 4, "K, rationales per question.")
flags.DEFINE_integer("prompt_tokens", 64, "P, prompt length.")
flags.DEFINE_integer("rationale_tokens", 128, "L, rationale length (no stop: every rationale runs to L).")
flags.DEFINE_integer("answer_tokens", 8, "Answer length.")
flags.DEFINE_integer("layers", 8, "Decoder layers of the benchmark's model (16: twice its layer parameters).")
flags.DEFINE_integer("microbatches", 0, "Micro-batches of the scoring and training passes, both sides "
                     "(0: 1 for the bench shape, 8 for --paper, as configs/base.py's LaTRO recipes).")
flags.DEFINE_integer("rounds", 3, "Measured updates per implementation (after one warm-up each).")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default, all cores).")
flags.DEFINE_bool("skip_torch", False, "Only time latro_jax.")
flags.DEFINE_bool("reuse_sampler_logprobs", True, "latro_jax takes the policy's log-probs from the sampler.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "latro_jax's layer rematerialisation in the step "
                  "(config model.remat): dots keeps the matmul outputs and recomputes the rest.")
flags.DEFINE_bool("share_prompts", True, "latro_jax runs each question's prompt once in the reference pass and the step.")

BETA, NONSTOP_PENALTY, SFT_COEF, LR = 0.05, 2.0, 1.0, 5e-7


def shape() -> dict:
    samples, prompt = (16, 128) if FLAGS.paper else (FLAGS.samples, FLAGS.prompt_tokens)
    microbatches = FLAGS.microbatches or (8 if FLAGS.paper else 1)
    return dict(N=FLAGS.questions, K=samples, P=prompt, L=FLAGS.rationale_tokens, A=FLAGS.answer_tokens,
                microbatches=microbatches, layers=FLAGS.layers)


class LatroJax:
    """The job's LaTRO update on token ids."""

    def __init__(self, folder: str, s: dict, prompts, answers):
        from latro_jax import models
        import types

        from latro_jax.algorithms import Context, Latro, LatroConfig, Learner
        from latro_jax.stops import Stops
        from latro_jax.train import OptimConfig
        cfg = LatroConfig(num_samples=s["K"], beta=BETA, nonstop_penalty=NONSTOP_PENALTY, sft_coef=SFT_COEF,
                          max_rationale_tokens=s["L"], reuse_sampler_logprobs=FLAGS.reuse_sampler_logprobs,
                          share_prompts=FLAGS.share_prompts)
        self.algorithm = Latro(cfg, Context(task=None, fmt=types.SimpleNamespace(stops=Stops(), pad_id=0),
                                                  microbatches=s["microbatches"]))
        self.learner = Learner(self.algorithm, models.load_hf(folder, remat=FLAGS.remat), OptimConfig(learning_rate=LR))
        self.prompts, self.answers = prompts, answers

    def update(self, round_: int) -> dict:
        import jax
        policies = self.learner.policies()
        t0 = time.perf_counter()
        ro = self.algorithm.sample(policies, self.prompts, self.answers, None, jax.random.key(round_))
        t1 = time.perf_counter()
        scored = self.algorithm.score(policies, ro)
        t2 = time.perf_counter()
        metrics = self.learner.apply(scored)
        jax.block_until_ready(self.learner.trainer.state.params)
        t3 = time.perf_counter()
        assert int(ro.lengths.min()) == ro.lengths.max() and "loss" in metrics
        return {"sample_s": t1 - t0, "score_s": t2 - t1, "step_s": t3 - t2}


class Torch:
    """The same update the PyTorch way."""

    def __init__(self, folder: str, s: dict, prompts, answers):
        import torch
        import transformers
        if FLAGS.threads:
            torch.set_num_threads(FLAGS.threads)
        self.torch, self.s = torch, s
        self.policy = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        self.reference = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0)
        self.prompts = torch.tensor(prompts).repeat_interleave(s["K"], dim=0)  # [N*K, P]
        self.answers = torch.tensor(answers).repeat_interleave(s["K"], dim=0)  # [N*K, A]

    def span_logprobs(self, model, rows):
        """log pi(z|x) and log pi(y|x+z) of [x | z | y] rows from one forward pass per micro-batch."""
        if rows.shape[0] > self.s["N"] * self.s["K"] // self.s["microbatches"]:
            parts = [self.span_logprobs(model, part) for part in rows.chunk(self.s["microbatches"])]
            return tuple(self.torch.cat(spans) for spans in zip(*parts))
        s = self.s
        logits = model(rows).logits[:, :-1].float()
        logp = self.torch.log_softmax(logits, dim=-1).gather(-1, rows[:, 1:, None])[..., 0]
        z = logp[:, s["P"] - 1:s["P"] - 1 + s["L"]].sum(-1)
        y = logp[:, s["P"] - 1 + s["L"]:].sum(-1)
        return z, y

    def update(self, round_: int) -> dict:
        torch, s = self.torch, self.s
        torch.manual_seed(round_)
        t0 = time.perf_counter()
        self.policy.eval()
        with torch.no_grad():
            out = self.policy.generate(self.prompts, attention_mask=torch.ones_like(self.prompts), do_sample=True,
                                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=s["L"],
                                       min_new_tokens=s["L"], pad_token_id=0)
        rows = torch.cat([out, self.answers], dim=1)
        t1 = time.perf_counter()
        with torch.no_grad():
            z_logp, y_logp = self.span_logprobs(self.policy, rows)
            ref_z_logp, _ = self.span_logprobs(self.reference, rows)
            # no rationale stops within L: every reward takes the non-stop penalty (SPEC 1.3)
            rewards = (NONSTOP_PENALTY * y_logp.mean()).expand_as(y_logp) - BETA * (z_logp - ref_z_logp)
            rewards = rewards.view(-1, s["K"])
            advantages = (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (s["K"] - 1)).view(-1)
        t2 = time.perf_counter()
        self.policy.train()
        self.optimizer.zero_grad()
        for part, a in zip(rows.chunk(s["microbatches"]), advantages.chunk(s["microbatches"])):
            z_logp, y_logp = self.span_logprobs(self.policy, part)  # gradients accumulate
            ((-a * z_logp - SFT_COEF * y_logp).sum() / len(advantages)).backward()
        self.optimizer.step()
        t3 = time.perf_counter()
        assert out.shape[1] == s["P"] + s["L"]
        return {"sample_s": t1 - t0, "score_s": t2 - t1, "step_s": t3 - t2}


def main(_):
    import numpy as np
    s = shape()
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, MODEL["vocab_size"], (s["N"], s["P"])).tolist()
    answers = rng.integers(1, MODEL["vocab_size"], (s["N"], s["A"])).tolist()
    with tempfile.TemporaryDirectory() as folder:
        make_model(folder, num_hidden_layers=s["layers"])
        impls = {"latro_jax": LatroJax(folder, s, prompts, answers)}
        if not FLAGS.skip_torch:
            impls["torch"] = Torch(folder, s, prompts, answers)
        for impl in impls.values():
            impl.update(-1)  # warm-up: compilation, allocator
        totals = {name: [] for name in impls}
        for round_ in range(FLAGS.rounds):
            for name, impl in impls.items():
                t = impl.update(round_)
                t["total_s"] = sum(t.values())
                totals[name].append(t["total_s"])
                if name == "torch":  # this round's ratio, against the latro_jax update just before
                    t["ratio"] = t["total_s"] / totals["latro_jax"][-1]
                print(json.dumps({"impl": name, "round": round_, **s, **{k: round(v, 3) for k, v in t.items()}}),
                      flush=True)
    summary = {f"{name}_median_s": round(float(np.median(v)), 3) for name, v in totals.items()}
    # the process's peak resident memory (both implementations, unless --skip_torch)
    summary["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    summary["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")  # the malloc both ran under
    if "torch" in totals:
        summary["ratio_torch_over_latro_jax"] = round(float(np.median(totals["torch"]) / np.median(totals["latro_jax"])), 2)
    print(json.dumps({"summary": True, **s, **summary}), flush=True)


if __name__ == "__main__":
    from latro_jax.huge_pages import reexec_with_huge_pages
    reexec_with_huge_pages()  # as the job does: malloc on transparent huge pages (GLIBC_TUNABLES= opts out)
    app.run(main)
