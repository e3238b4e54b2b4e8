"""Winner's curse, measured: N trials no better than the champion; how often would each rule promote one?

Per repetition: a champion's per-prediction values and N trials that only add zero-mean noise (none is
better). Rules compared: the best trial on test with its raw paired-bootstrap p-value (the old rule),
Holm over all trials (pipeline.tracking.decision.holm_winner, used without a valid split), and a trial selected on
validation (independent of the test noise, so any trial) with its raw p-value (the rule with a valid
split). Run: ``.venv/bin/python bench/bench_winners_curse.py`` (about 1.5 min on 2 cores).
"""
import numpy as np

from pipeline.tracking.decision import Rules, holm_winner, judge, paired_bootstrap

rng = np.random.default_rng(0)
N, n, reps, samples = 8, 1000, 1000, 500
rules = Rules(margin=0.0, significance=0.05)
false = {"max on test, raw p": 0, "Holm over all": 0, "selected on valid, raw p": 0}
for rep in range(reps):
    champion = rng.uniform(0, 1, n)
    trials = [champion + rng.normal(0, 0.3, n) for _ in range(N)]  # none better in expectation
    tests = {i: paired_bootstrap(t, champion, samples=samples, seed=rep * 100 + i) for i, t in enumerate(trials)}
    best = max(tests, key=lambda i: tests[i].mean_diff)
    false["max on test, raw p"] += judge(tests[best], tests[best].p_value, rules)[0]
    false["Holm over all"] += holm_winner(tests, rules)[0] is not None
    chosen = int(rng.integers(N))  # validation noise is independent of test noise: any trial, at random
    false["selected on valid, raw p"] += judge(tests[chosen], tests[chosen].p_value, rules)[0]
for rule, count in false.items():
    print(f"{rule:<28} false promotions {count}/{reps} = {count / reps:.3f}")
