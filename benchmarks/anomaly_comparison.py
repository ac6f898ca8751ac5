"""The autoencoder detector against IsolationForest, LocalOutlierFactor (novelty) and OneClassSVM, several seeds.

    python benchmarks/anomaly_comparison.py [--seeds 0 1 2] [--datasets breast_cancer synthetic_fraud]

Every detector is fitted on the same normal-only training rows and scored on the same test rows of each split.
breast_cancer: 250 benign rows train; the other 107 benign + 212 malignant test. synthetic_fraud: 4000 normal
transactions train; the other ~16000 (≈0.17 % fraud) test. Prints one JSON line per (dataset, detector) with
mean/std over seeds, then a table.
"""

import argparse
import json

from sae_toolkit.baselines.comparison import DETECTORS, format_table, run_comparison, summarize

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "synthetic_fraud"],
                    choices=["breast_cancer", "synthetic_fraud"])
parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
args = parser.parse_args()

results = run_comparison(args.datasets, args.seeds, args.detectors)
for row in summarize(results).to_dict(orient="records"):
    print(json.dumps({"benchmark": "anomaly_comparison", **row}))
print(format_table(results))
