"""Defaults shared by every recipe (SPEC 1.5 where the paper fixes a value)."""

import ml_collections

from latro_jax.meta_prover import R1_SUFFIX  # SPEC 2.3: the analysis code's termination text


def optim(lr: float, schedule: str = "linear", warmup_steps: int = 0, weight_decay: float = 0.0):
    return dict(learning_rate=lr, schedule=schedule, warmup_steps=warmup_steps, b1=0.9,
                b2=0.999, eps=1e-8, weight_decay=weight_decay, grad_clip=0.0)


def get_base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "latro"  # comma list of stage sections, run in order
    c.model = dict(
        path="",  # HF folder or hub id; empty: build from `init`
        init=dict(family="llama", hidden_size=0, intermediate_size=0, num_layers=0, num_heads=1,
                  num_kv_heads=1, head_dim=0, max_position_embeddings=1024,
                  tie_word_embeddings=True, initializer_range=0.02),
        dtype="bfloat16", param_dtype="float32", remat="full",
        query_chunk=0,  # attention over that many query positions at a time (0: all): long rows
        # LoRA adapters: rank 0 = off (every weight trains); r > 0 = adapters on `targets` train,
        # the base is frozen and is the reference (scale alpha / r, as PEFT)
        lora=dict(rank=0, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"), dtype="float32"))
    c.tokenizer = dict(path="", build="")  # path defaults to model.path; build: "", "char", "words"
    c.task = dict(name="gsm8k", source="../shared/data/gsm8k", eval_source="", config_name="",
                  train_split="train", eval_split="test", val_split="", sft_examples=7473,
                  too_long="refuse",  # too_long: examples past max_position_embeddings: refuse | drop
                  prompt_width=0)  # prompt columns: 0 = the stage's longest (one compile), N, -1 = per batch
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Stage sections: the stage keys (algorithm = the section name unless given, steps,
    # batch_size = questions per update, microbatches, logprob_chunk, sample_rows_per_call = the
    # rows one sampler program holds, 0 = all: fewer bound the KV cache's memory, in more calls,
    # with the same samples; optim) and the algorithm's own keys (latro_jax/algorithms/<name>.py:
    # its Config dataclass documents each one).
    c.sft = dict(steps=1, batch_size=64, microbatches=1, optim=optim(1e-5))
    c.latro = dict(steps=117, batch_size=24, num_samples=16, beta=0.05, nonstop_penalty=2.0,
                   sft_coef=1.0, max_rationale_tokens=500,
                   sampling=dict(temperature=1.0, top_k=0, top_p=1.0),
                   reuse_sampler_logprobs=True,  # the policy's log-probs from the sampler (T = 1 only)
                   share_prompts=True,  # the reference pass and the step run each prompt once per question
                   microbatches=1, logprob_chunk=128, sample_rows_per_call=0, optim=optim(5e-7))
    # The likelihood-reward family (SPEC 3.1; algorithms/likelihood.py): LaTRO's rollout keys
    # (num_samples, max_rationale_tokens, sampling, reuse_sampler_logprobs, share_prompts), no KL
    # and no reference pass. VeriFree: reward prob | logprob (pi(y|x+z), 0 unfinished),
    # answer_weight reward | advantage | one. JEPO: mode single | multi (the Jensen bound).
    rationale = dict(sampling=dict(temperature=1.0, top_k=0, top_p=1.0), reuse_sampler_logprobs=True,
                     share_prompts=True, microbatches=1, logprob_chunk=128, sample_rows_per_call=0)
    c.verifree = dict(rationale, steps=100, batch_size=16, num_samples=8, max_rationale_tokens=3000, reward="prob",
                      answer_weight="reward", optim=optim(1e-6, "constant"))
    c.jepo = dict(rationale, steps=100, batch_size=16, num_samples=8, max_rationale_tokens=500, mode="multi",
                  optim=optim(1e-6, "constant"))
    # The GRPO family (SPEC 2.5; latro_jax/algorithms/group_rl.py) shares two blocks: `rollout`,
    # G completions per question (num_samples) of at most max_tokens at `sampling` (T 0.9), and
    # `loss`, the clipped surrogate (clip_eps) + beta * k3 KL to the reference (0: no reference
    # pass), aggregation token | sequence | dr_grpo, log-probs at the sampling temperature.
    # Outcome-reward GRPO (algorithms/mrt.py:GrpoConfig): advantage group | rloo (leave-one-out,
    # unscaled); scaling of the group advantages group | batch | none (Dr. GRPO); reward_kl beta_r:
    # the advantages read r - beta_r sum_t (log pi_old - log pi_ref) (0 = off); length_penalty
    # lambda: they read r - lambda |z| / max_tokens (0 = off; MRT too); share_prompts: the
    # scoring passes and the step run each prompt once per question.
    group = dict(num_samples=4, max_tokens=512, sampling=dict(temperature=0.9, top_k=0, top_p=1.0))
    policy_loss = dict(objective="clip", clip_eps=0.2, clip_eps_high=0.0, cispo_max=5.0, cispo_clip="upper",
                       beta=0.04, aggregation="token", logprobs_at_temperature=True, updates_per_rollout=1)
    rl_optim = optim(1e-6, "cosine", warmup_steps=10, weight_decay=0.01)
    grpo = dict(steps=100, batch_size=16, rollout=group, loss=policy_loss, advantage="group", scaling="group",
                advantage_eps=1e-4, reward_kl=0.0, length_penalty=0.0, share_prompts=True, microbatches=1, logprob_chunk=128,
                sample_rows_per_call=0, optim=rl_optim)
    c.grpo = dict(grpo)  # (a ConfigDict copies the dicts it is given)
    # The GRPO variants (SPEC 3.2; algorithms/grpo_variants.py): GRPO's keys with their papers'
    # loss settings. `loss.objective` clip | gspo | cispo | rloo; clip range (1 - clip_eps,
    # 1 + clip_eps_high), clip_eps_high 0 = symmetric; updates_per_rollout mu: the batch's groups
    # in mu mini-batches, one optimizer step each against pi_old = the sampling policy (clipping
    # acts only when mu > 1; batch_size must be a multiple of mu). DAPO adds overlong_cache L_c
    # (the overlong shaping of its +-1 reward; 0 = off), drop_uniform_groups (its dynamic
    # sampling's filter) and the refill: up to refill_rounds more rounds of refill_factor batches
    # of questions until batch_size groups are kept (0 = off; the paper 10 rounds of 3).
    # Dr. GRPO: grpo with scaling="none" and loss.aggregation="dr_grpo".
    c.dapo = dict(grpo, loss=dict(policy_loss, clip_eps_high=0.28, beta=0.0), advantage_eps=1e-6,
                  rollout=dict(group, sampling=dict(temperature=1.0, top_k=0, top_p=1.0)),
                  overlong_cache=128, drop_uniform_groups=True, refill_rounds=0, refill_factor=3)
    c.gspo = dict(grpo, loss=dict(policy_loss, objective="gspo", clip_eps=3e-4, clip_eps_high=4e-4, beta=0.0,
                                  aggregation="sequence", updates_per_rollout=4))
    c.cispo = dict(grpo, loss=dict(policy_loss, objective="cispo", beta=0.0))
    c.rloo = dict(grpo, rollout=dict(group, num_samples=2), advantage="rloo", reward_kl=0.05,
                  loss=dict(policy_loss, objective="rloo", beta=0.0, aggregation="sequence"))
    # RLPR (SPEC 3.1; algorithms/rlpr.py): GRPO's keys; the reward is the mean probability of
    # the gold answer's tokens after the completion's reasoning, less the same with no reasoning
    # under pi_0: R = (1 - format_weight) max(r - r', 0) + format_weight * format; std_filter drops
    # a group whose reward std < ratio x EMA (decay; the EMA starts as the mean over updates
    # warmup_start..warmup_end and the filter acts after them; ratio 0 = off).
    c.rlpr = dict(grpo, rollout=dict(group, num_samples=8, sampling=dict(temperature=1.0, top_k=0, top_p=1.0)),
                  loss=dict(policy_loss, clip_eps_high=0.27, beta=0.0, updates_per_rollout=4), advantage_eps=1e-6,
                  format_weight=0.1, std_filter=dict(ratio=0.5, decay=0.99, warmup_start=6, warmup_end=10),
                  optim=optim(1e-6, "constant"))
    # MRT-RL (SPEC 2.6; algorithms/mrt.py:MrtConfig): GRPO's keys plus prefixes traces | empty (a
    # pi_old trace cut after j ~ U{0..k-1} episodes), prefix_refresh (0: pi_old = the stage's
    # start; N: the policy every N updates), budget full | remaining, advantage (the reading,
    # mrt.READINGS) termination | mixed | group | rloo, alpha (the progress bonus of `group` and
    # `episode`; refused > 0 with termination / mixed, which do not read it; SPEC: not published,
    # the authors' re-implementation used 1.0), continuation full | episode, segment
    # (episodes.py:SegmentConfig: rule markers | end_tokens, markers, gap, max_splits, end_texts,
    # group_size, thinking_end) and forcing (meta_prover.py:ForcingConfig: suffix, estimator
    # mc | likelihood, samples m, sampling, answer_tokens).
    segment = dict(rule="end_tokens", markers=("Wait", "But wait", "Alternatively",
                                               "Is there another way to think about this?",
                                               "But let me double-check", "But hold on"),
                   gap=2, max_splits=99, end_texts=(".",), group_size=1, thinking_end=())
    forcing = dict(suffix=" The answer is", estimator="mc", samples=8,
                   sampling=dict(temperature=0.6, top_k=0, top_p=0.95), answer_tokens=16)
    c.mrt = dict(steps=100, batch_size=16, rollout=dict(group), loss=dict(policy_loss), scaling="group",
                 advantage_eps=1e-4, reward_kl=0.0, length_penalty=0.0, share_prompts=True, prefixes="traces",
                 prefix_refresh=0,
                 budget="full", advantage="termination",
                 alpha=0.0, continuation="full", segment=dict(segment), forcing=dict(forcing), microbatches=1,
                 logprob_chunk=128, sample_rows_per_call=0, optim=dict(rl_optim))
    # MRT-STaR (SPEC 2.7; algorithms/mrt_star.py): rounds of K traces per question (the `rollout`
    # block, drawn at T 1), J at every prefix, filter max_prefix | nonneg | outcome (vanilla
    # STaR), keep_per_question, then
    # completion-only fine-tuning on the kept traces: `epochs` optimizer steps on them per round
    # (the paper: 3 epochs over the collected set; the schedule counts steps x epochs).
    c.mrt_star = dict(steps=20, batch_size=16,
                      rollout=dict(group, sampling=dict(temperature=1.0, top_k=0, top_p=1.0)), filter="max_prefix",
                      keep_per_question=1, epochs=3, segment=dict(segment), forcing=dict(forcing), microbatches=1,
                      logprob_chunk=128, sample_rows_per_call=0, optim=optim(1e-6, "constant"))
    # every: validate on task.val_split every N updates (0 = off); the checkpoint with the best
    # validation greedy accuracy is kept besides the last `checkpoint.keep`.
    # forced_budgets / regret_cutoffs (SPEC 2.4): the forced-answer accuracy curve of the greedy
    # trace (cut at b tokens, or at the last episode end <= b with forced_at="episode") and
    # normalised regret, both off when empty; forcing: greedy forced answers after the suffix;
    # truncated_budgets: the score of the plain output cut at b tokens (no forcing).
    c.eval = dict(max_new_tokens=500, batch_size=64, maj_k=8, temperature=1.0, limit=0, every=0,
                  forced_budgets=(), forced_at="tokens", regret_cutoffs=(), truncated_budgets=(),
                  forcing=dict(forcing, estimator="mc", samples=1, sampling=dict(temperature=0.0, top_k=0, top_p=1.0)),
                  segment=dict(segment))
    c.checkpoint = dict(every=10, keep=3)
    c.export = dict(hf=True, peft=False)  # peft: also <workdir>/peft, the LoRA adapters for PEFT
    return ml_collections.ConfigDict(c)


PAPER_TASKS = {  # SPEC 1.5: beta and number of updates per task
    "gsm8k": dict(name="gsm8k", source="../shared/data/gsm8k", beta=0.05, steps=117),
    "arc": dict(name="arc_challenge", source="../shared/data/arc_challenge", beta=0.25, steps=35),
}


# Phi-3.5-mini has no GQA (32 key/value heads): its KV cache for 384 rows at L = 500 is ~15 GB
# per v5e chip, so its sampler runs 8 questions x K = 16 at a time (docs/tpu.md)
PAPER_SAMPLE_ROWS = {"microsoft/Phi-3.5-mini-instruct": 128}


def paper_recipe(model_path: str, task: str, stages: str, sft_coef: float = 0.0) -> ml_collections.ConfigDict:
    """The paper's set-up for one model and task: full fine-tuning with bf16 compute and remat,
    parameters sharded over 8 devices (fsdp), 500-token greedy / maj@8 evaluation. stages
    "latro": K = 16, L = 500, T = 1, 24 questions per update, AdamW 5e-7 linear decay, and
    c_sft = 0 as the released code trains (its default, never changed by its training script;
    SPEC 1.2) -- the *_csft1 recipes use the derivation's c_sft = 1. stages "sft": the SFT
    baseline on the gold rationales."""
    t = PAPER_TASKS[task]
    c = get_base()
    c.stages = stages
    c.model.update(path=model_path, dtype="bfloat16", param_dtype="float32", remat="full")
    c.task.update(name=t["name"], source=t["source"], train_split="train", eval_split="test")
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.latro.update(steps=t["steps"], batch_size=24, num_samples=16, beta=t["beta"], sft_coef=sft_coef,
                   microbatches=8, sample_rows_per_call=PAPER_SAMPLE_ROWS.get(model_path, 0))
    c.sft.update(steps=300, batch_size=64, microbatches=4, optim=optim(1e-6, "cosine", warmup_steps=30))
    c.eval.update(max_new_tokens=500, maj_k=8)
    return c


def family_recipe(stage: str, model_path: str) -> ml_collections.ConfigDict:
    """DAPO, VeriFree or RLPR with its paper's published hyper-parameters (SPEC 3.1-3.2) on GSM8K
    (the LaTRO recipes' task and prompt, whose rationales end in "The answer is", the y every
    likelihood reward scores and RLPR's answer marker; the papers trained on DAPO-Math-17K and
    WebInstruct): full fine-tuning, bf16 compute, remat, fsdp over 8 devices, the model as
    --config.model.path. Published and set: dapo 512 prompts x 16 at T 1, 16 updates per
    rollout, completions <= 20,480 tokens with the overlong shaping from 16,384 (L_c 4,096),
    clip (0.2, 0.28), `token`, beta 0, advantage eps 1e-6, dynamic sampling (the filter and up
    to 10 refill rounds of 3 batches), AdamW
    1e-6 constant after a linear warm-up of 20 rollouts (320 optimizer steps); verifree K 8 at
    T 1, rationales <= 3,000 tokens, 16 questions per update, R = pi(y|x+z) weighting the
    answer term, lr 1e-6 constant, one step per rollout; rlpr 768 prompts x 8 at T 1, 4 updates
    per rollout, completions <= 3,072 tokens, clip (0.2, 0.27), `token`, beta 0, the std filter
    (0.5, EMA 0.99 after updates 6-10), lr 1e-6 constant. Ours: the number of updates, the
    micro-batches (1 row per device), evaluation (greedy and maj@8 at the training length).
    Not here: RLPR's refill of dropped groups and its entropy bonus."""
    c = get_base()
    c.stages = stage
    c.model.update(path=model_path, dtype="bfloat16", param_dtype="float32", remat="full")
    t = PAPER_TASKS["gsm8k"]
    c.task.update(name=t["name"], source=t["source"], train_split="train", eval_split="test")
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    t1 = dict(temperature=1.0, top_k=0, top_p=1.0)
    if stage == "dapo":
        c.dapo.update(steps=200, batch_size=512, rollout=dict(num_samples=16, max_tokens=20480, sampling=t1),
                      loss=dict(clip_eps=0.2, clip_eps_high=0.28, beta=0.0, aggregation="token",
                                updates_per_rollout=16),
                      advantage_eps=1e-6, overlong_cache=4096, drop_uniform_groups=True, refill_rounds=10,
                      refill_factor=3, microbatches=64,
                      optim=optim(1e-6, "constant", warmup_steps=20 * 16))
        length = 20480
    elif stage == "verifree":
        c.verifree.update(steps=500, batch_size=16, num_samples=8, max_rationale_tokens=3000, sampling=t1,
                          reward="prob", answer_weight="reward", microbatches=16, optim=optim(1e-6, "constant"))
        length = 3000
    elif stage == "rlpr":
        c.rlpr.update(steps=200, batch_size=768, rollout=dict(num_samples=8, max_tokens=3072, sampling=t1),
                      loss=dict(clip_eps=0.2, clip_eps_high=0.27, beta=0.0, aggregation="token",
                                updates_per_rollout=4),
                      advantage_eps=1e-6, format_weight=0.1,
                      std_filter=dict(ratio=0.5, decay=0.99, warmup_start=6, warmup_end=10), microbatches=192,
                      sample_rows_per_call=512,  # 12 sampler calls of 64 questions (docs/tpu.md)
                      optim=optim(1e-6, "constant"))
        length = 3072
    else:
        raise ValueError(f"family_recipe: no published recipe for {stage!r} (dapo, verifree, rlpr)")
    c.eval.update(max_new_tokens=length, maj_k=8)
    return c


def r1_mrt_recipe(algorithm: str) -> ml_collections.ConfigDict:
    """MRT-RL or its outcome-reward GRPO baseline on DeepSeek-R1-Distill-Qwen-1.5B (SPEC 2.6,
    the paper's Table 3 where published): DeepScaleR problems, bare problem as the user turn,
    answers in the last \\boxed{}; lr 1e-6 cosine with 10% warm-up, weight decay 0.01, 256
    completions per update (64 problems x G = 4) at T 0.9, completions up to 16,384 tokens, bf16
    compute, fsdp over 8 devices. Not published (our choices, SPEC 2.6): the `termination`
    advantage of the authors' RL README (alpha unused; `group` with alpha 1.0 is the authors'
    later re-implementation's bonus), m = 8 forced answers at T 0.6 / top-p 0.95 (the analysis
    code), beta 0.04 (TRL's default then), prefixes from the starting model (at most 4,096
    tokens, the paper's prompt length), log-probabilities at T = 1 as the paper's TRL computed
    them, the number of updates. Evaluation on MATH-500, the authors' analysis recipe: greedy
    and sampled pass@1 (16 traces per problem at T 0.6 / top-p 0.95) at 16,384 tokens, the
    forced-answer curve at episode boundaries (episodes in groups of 10) and normalised regret
    at cutoffs up to 16,384 over those traces, forced answers m = 8 at T 0.6 / top-p 0.95 of up
    to 4,096 tokens ("\n</think>" after the whole thinking). What still differs from the paper:
    the data (DeepScaleR / MATH-500 from local copies, the paper's AIME / AMC / Minerva sets not
    included), the unpublished values above, and the RL trainer itself (never released)."""
    c = get_base()
    c.stages = algorithm
    # 16k-token traces: attention 1,024 query positions at a time (dense scores of a 20k-token
    # row: 24 GB per v5e chip), the sampler 64 rows per call (docs/tpu.md)
    c.model.update(path="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", dtype="bfloat16",
                   param_dtype="float32", remat="full", query_chunk=1024)
    c.task.update(name="math_boxed", source="agentica-org/DeepScaleR-Preview-Dataset", train_split="train",
                  eval_source="HuggingFaceH4/MATH-500", eval_split="test", sft_examples=0)
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    r1_segment = dict(c.mrt.segment, rule="markers", max_splits=99, group_size=1, thinking_end=("</think>",))
    # forced answers: "Time is up. ..." after a partial thinking, "\n</think>" after the whole one
    # (the model then answers on its own), m = 8 at T 0.6 / top-p 0.95, up to 4,096 answer tokens
    r1_forcing = dict(suffix=R1_SUFFIX, final_suffix="\n</think>", estimator="mc", samples=8,
                      sampling=dict(temperature=0.6, top_k=0, top_p=0.95), answer_tokens=4096)
    # the paper's TRL scored log-probabilities without dividing by T (policy and reference alike)
    rl = dict(steps=300, batch_size=64, rollout=dict(num_samples=4, max_tokens=16384,
                                                     sampling=dict(temperature=0.9, top_k=0, top_p=1.0)),
              loss=dict(clip_eps=0.2, beta=0.04, aggregation="token", logprobs_at_temperature=False),
              microbatches=32, sample_rows_per_call=64,
              optim=optim(1e-6, "cosine", warmup_steps=30, weight_decay=0.01))
    c.grpo.update(**rl, scaling="group")
    c.mrt.update(**rl, prefixes="traces", prefix_refresh=0, max_prefix_tokens=4096, budget="full",
                 advantage="termination", alpha=0.0, continuation="full", segment=r1_segment, forcing=r1_forcing)
    # the analysis recipe: 16 traces per problem at T 0.6 / top-p 0.95 (pass@1 beside greedy),
    # episodes merged in groups of 10, forced answers as in training, cutoffs up to 16,384
    c.eval.update(max_new_tokens=16384, batch_size=64, maj_k=0, traces=16,
                  trace_sampling=dict(temperature=0.6, top_k=0, top_p=0.95),
                  forced_budgets=(2048, 4096, 8192, 12288, 16384), forced_at="episode",
                  regret_cutoffs=(4096, 8192, 12288, 16384), segment=dict(r1_segment, group_size=10),
                  forcing=dict(r1_forcing))
    return c
