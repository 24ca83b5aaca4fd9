#!/usr/bin/env python
"""Which long-tailed method on my data, with my backbone? ``python recipes/compare.py --dataset digits``.

Equal tuning budget per method (Optuna), every trial scored by stratified K-fold cross-validation on the pooled
train and validation rows, the chosen configuration retrained for several seeds, the test split read once per
method and seed. See ``python recipes/compare.py --help`` and the README.
"""

import sys

from pih2t_hub.compare_cli import main

if __name__ == "__main__":
    sys.exit(main())
