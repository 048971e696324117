"""Deterministic, seeded generator of ML-abstract-like text (labelled *synthetic* everywhere).

A small grammar: an abstract is a context sentence, a problem sentence, a contribution, two to
five method sentences, experiments, results and a closing line; each slot draws from word lists
sized so word clouds and learning curves look like text (a few thousand distinct words, Zipf-ish
reuse of common phrases). Lengths land around 100-250 words, like real abstracts. The output is a
pure function of (GENERATOR_VERSION, SYNTHETIC_SEED, n): bump GENERATOR_VERSION whenever the
grammar changes, since it is part of the shards' fingerprint.
"""

from __future__ import annotations

import random

GENERATOR_VERSION = 1
SYNTHETIC_SEED = 20240601

W = str.split
TASKS = W("""image-classification object-detection semantic-segmentation machine-translation
question-answering text-summarization speech-recognition language-modeling graph-classification
link-prediction node-classification time-series-forecasting anomaly-detection recommendation
reinforcement-learning offline-reinforcement-learning causal-inference density-estimation
protein-structure-prediction molecular-property-prediction code-generation visual-question-answering
image-generation video-understanding domain-adaptation continual-learning federated-learning
few-shot-classification active-learning neural-architecture-search tabular-regression
survival-analysis point-cloud-registration motion-planning weather-forecasting drug-discovery""")
TASKS = [t.replace("-", " ") for t in TASKS]
MODELS = W("""transformers diffusion-models graph-neural-networks convolutional-networks
recurrent-networks variational-autoencoders normalizing-flows gaussian-processes mixture-of-experts
state-space-models kernel-machines random-forests gradient-boosted-trees energy-based-models
neural-operators large-language-models vision-transformers contrastive-encoders spiking-networks
implicit-neural-representations bayesian-neural-networks autoregressive-models""")
MODELS = [m.replace("-", " ") for m in MODELS]
METHOD_PREFIX = W("""Adaptive Sparse Hierarchical Contrastive Robust Efficient Scalable Latent Bayesian
Federated Causal Spectral Stochastic Implicit Modular Progressive Dynamic Equivariant Differentiable
Multiscale Gated Residual Structured Calibrated Conformal Temporal Geometric Compositional""")
METHOD_CORE = W("""Attention Routing Distillation Pruning Quantization Alignment Augmentation Pretraining
Regularization Sampling Tokenization Retrieval Planning Inference Optimization Mixing Prompting
Matching Transport Denoising Embedding Memory Search Decoding Calibration Fusion Alignment""")
DATASETS = W("""ImageNet CIFAR-10 CIFAR-100 COCO WMT14 SQuAD GLUE SuperGLUE LibriSpeech WikiText-103
OGB-Arxiv Cora PubMed MIMIC-III ETTh1 Electricity Traffic D4RL Atari MuJoCo QM9 ZINC HumanEval MBPP
VQAv2 Kinetics-400 ADE20K Cityscapes MovieLens Criteo ShapeNet KITTI nuScenes CheXpert""")
METRICS = W("""accuracy F1 BLEU ROUGE perplexity AUROC mean-average-precision calibration-error
word-error-rate FID return sample-efficiency throughput latency memory-footprint robustness
negative-log-likelihood mean-squared-error top-1-accuracy recall""")
METRICS = [m.replace("-", " ") for m in METRICS]
ADJ = W("""strong competitive consistent substantial significant notable marked remarkable modest
robust reliable favorable superior comparable""")
PROPERTY = W("""convergence generalization stability expressivity identifiability consistency
sample-complexity regret calibration fairness privacy interpretability scalability
robustness-to-distribution-shift uncertainty-quantification""")
PROPERTY = [p.replace("-", " ") for p in PROPERTY]
CHALLENGE = [
    "they require large amounts of labeled data", "their computational cost grows quadratically "
    "with the input length", "they are brittle under distribution shift", "they often produce "
    "overconfident predictions", "they scale poorly to high-dimensional inputs", "training them "
    "remains unstable and sensitive to hyperparameters", "their decisions are difficult to "
    "interpret", "they ignore the structure shared across related tasks", "they struggle with "
    "long-range dependencies", "they memorize spurious correlations in the training data",
    "privacy constraints prevent centralizing the data", "existing benchmarks overestimate their "
    "performance",
]
COMPONENT = W("""encoder decoder objective regularizer sampler scheduler router memory-bank
loss-function attention-mechanism normalization-layer optimizer prior posterior critic
tokenizer projection-head""")
COMPONENT = [c.replace("-", " ") for c in COMPONENT]
VERB_INTRO = W("introduce propose present develop design")
VERB_SHOW = W("show demonstrate prove establish find observe")
ADVERB = W("jointly efficiently explicitly adaptively provably implicitly iteratively")
THEORY = W("bound guarantee rate theorem analysis characterization")

CONTEXT = [
    "{Models} have become the dominant approach for {task}.",
    "Recent advances in {models} have led to rapid progress in {task} and related problems.",
    "{Task} is a fundamental problem in machine learning with applications in science and industry.",
    "Despite their success, {models} remain poorly understood from a theoretical perspective.",
    "Learning useful representations for {task} is a long-standing challenge.",
    "The growing availability of unlabeled data has renewed interest in {task}.",
    "Many practical systems for {task} rely on {models} trained with large amounts of compute.",
]
PROBLEM = [
    "However, {challenge}, which limits their use in practice.",
    "A key limitation of existing methods is that {challenge}.",
    "Existing approaches for {task} suffer from two issues: {challenge}, and {challenge2}.",
    "In many realistic settings, {challenge}.",
    "Moreover, little is known about the {property} of these methods when {challenge}.",
]
CONTRIB = [
    "In this paper, we {intro} {Method}, {a_adj2} framework that {adverb} learns the {component} "
    "and the {component2}.",
    "We {intro} {Method}, a simple method for {task} based on {models}.",
    "To address this, we {intro} {Method}, which combines a learned {component} with {a_adj2} "
    "{component2}.",
    "This work presents {Method}, a principled approach to {task} that improves {property}.",
]
METHOD = [
    "Our key insight is that the {component} can be decomposed into a small number of "
    "{adj2} factors.",
    "The method replaces the standard {component} with {a_adj2} variant that costs {k} times "
    "less compute.",
    "We derive a {theory} on the {property} of the resulting estimator under mild assumptions.",
    "Unlike prior work, our approach does not require access to labels during pretraining.",
    "We further {intro} a curriculum that gradually increases the difficulty of the training examples.",
    "Training proceeds in two stages: the {component} is first pretrained and then fine-tuned "
    "together with the {component2}.",
    "Theoretically, we {show} that {Method} achieves a {theory} of order {rate} for {property}.",
    "The {component} is shared across tasks, which allows knowledge transfer between {task} and "
    "{task2}.",
    "We also analyze the role of the {component} and {show} that it controls the {property} of "
    "the model.",
    "Our analysis reveals a trade-off between {property} and {property2} that previous work has "
    "overlooked.",
    "The resulting objective can be optimized with stochastic gradient descent and adds negligible "
    "overhead.",
    "We instantiate the framework with {models} and with {models2}, and study how the choice of "
    "{component} affects {metric}.",
    "In contrast to heuristic alternatives, every step of {Method} has a clear probabilistic "
    "interpretation.",
    "The approach is compatible with existing pipelines for {task} and requires no additional "
    "supervision.",
]
EXPERIMENTS = [
    "We evaluate {Method} on {dataset}, {dataset2} and {dataset3}.",
    "Experiments on {n} benchmarks, including {dataset} and {dataset2}, cover {task} and {task2}.",
    "Extensive experiments on {dataset} and {dataset2} confirm our analysis.",
    "Ablation studies isolate the contribution of the {component} and of the {component2}.",
]
RESULTS = [
    "{Method} improves {metric} by {pct}% over the strongest baseline while using {k}x fewer "
    "parameters.",
    "Our method achieves {adj} gains in {metric} and {metric2}, reaching {score} on {dataset}.",
    "Results show {adj} improvements in {metric}, especially in the low-data regime.",
    "Compared with {models}, {Method} improves {metric} by {pct}% at the same computational budget.",
]
DISCUSSION = [
    "We further observe that {Method} is less sensitive to hyperparameters than {models}.",
    "Qualitative analysis shows that the learned {component} captures meaningful structure in the data.",
    "The gains are largest on {dataset}, where {challenge}.",
    "We discuss the limitations of our approach and outline directions for future work.",
]
CLOSING = [
    "Code and pretrained models are publicly available.",
    "These results suggest that {property} is a key ingredient for {task}.",
    "We hope this work encourages further research on {property} in {models}.",
    "Our findings highlight the importance of the {component} for {task}.",
]
TITLES = [
    "{Method}: {Adj} {Task} with {Models}",
    "Towards {Adj} {Task} via {Method}",
    "On the {Property} of {Models} for {Task}",
    "{Method}: Learning {Component}s for {Task}",
]
RATES = ["1/sqrt(n)", "log(n)/n", "1/n", "sqrt(d/n)"]


def _title(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split())


class _Grammar:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, items):
        # Zipf-ish: earlier entries are more frequent, like real word usage.
        if self.rng.random() < 0.5:
            return items[min(int(self.rng.paretovariate(0.8)) - 1, len(items) - 1)]
        return items[self.rng.randrange(len(items))]

    def document(self) -> tuple[str, str]:
        r, pick = self.rng, self.pick
        if r.random() < 0.4:  # an acronym name, sometimes versioned
            method = "".join(w[0] for w in (pick(METHOD_PREFIX), pick(METHOD_CORE), pick(COMPONENT)))
            method = method.upper() + (f"-{r.randint(2, 4)}" if r.random() < 0.3 else "")
        else:
            method = pick(METHOD_PREFIX) + pick(METHOD_CORE)
        slots = dict(
            task=pick(TASKS), task2=pick(TASKS), models=pick(MODELS), models2=pick(MODELS),
            challenge=pick(CHALLENGE), challenge2=pick(CHALLENGE), Method=method, adj=pick(ADJ),
            adj2=pick(PROPERTY).split()[0] + "-aware", adverb=pick(ADVERB), component=pick(COMPONENT),
            component2=pick(COMPONENT), property=pick(PROPERTY), property2=pick(PROPERTY),
            intro=pick(VERB_INTRO), show=pick(VERB_SHOW), theory=pick(THEORY), dataset=pick(DATASETS),
            dataset2=pick(DATASETS), dataset3=pick(DATASETS), metric=pick(METRICS),
            metric2=pick(METRICS), n=r.randint(3, 12), k=r.randint(2, 8),
            pct=f"{r.uniform(0.5, 25):.1f}", score=f"{r.uniform(40, 99):.1f}", rate=r.choice(RATES),
        )
        slots["a_adj2"] = ("an " if slots["adj2"][0] in "aeiou" else "a ") + slots["adj2"]
        slots.update(Models=slots["models"][:1].upper() + slots["models"][1:], Task=_title(slots["task"]),
                     Adj=_title(slots["adj"]), Property=_title(slots["property"]),
                     Component=_title(slots["component"]))
        parts = [r.choice(CONTEXT)]
        if r.random() < 0.5:
            parts.append(r.choice(CONTEXT))
        parts += [r.choice(PROBLEM), r.choice(CONTRIB)]
        parts += r.sample(METHOD, r.randint(2, 7))
        parts += r.sample(EXPERIMENTS, r.randint(1, 2))
        parts += r.sample(RESULTS, r.randint(1, 2))
        parts += r.sample(DISCUSSION, r.randint(0, 2))
        parts.append(r.choice(CLOSING))
        text = " ".join(p.format_map(slots) for p in parts)
        return r.choice(TITLES).format_map(slots), text[:1].upper() + text[1:]


def generate_batches(n: int, batch: int, seed: int = SYNTHETIC_SEED):
    """Columns `title` and `abstract` of n synthetic documents, `batch` at a time; the same
    (seed, n) gives the same text, however it is batched."""
    # random.Random seeded with an int gives the same stream on every Python 3 version.
    grammar = _Grammar(random.Random(seed * 1000 + GENERATOR_VERSION))
    for start in range(0, n, max(1, batch)):
        docs = [grammar.document() for _ in range(min(batch, n - start))]
        yield {"title": [t for t, _ in docs], "abstract": [a for _, a in docs]}


def generate_table(n: int, seed: int = SYNTHETIC_SEED) -> dict[str, list[str]]:
    """Columns `title` and `abstract` for n synthetic documents at once."""
    out = {"title": [], "abstract": []}
    for part in generate_batches(n, max(1, n), seed):
        for k in out:
            out[k] += part[k]
    return out
