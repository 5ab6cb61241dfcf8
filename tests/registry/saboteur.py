"""A test estimator that is good everywhere but one slice (rows whose ordinal-encoded `plan` is 1)."""

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

PLAN_COLUMN = 10  # 9 numeric features, then contract, plan, ... (ordinal codes: basic 0, premium 1, standard 2)


class WorseOnPremium(HistGradientBoostingClassifier):
    def predict_proba(self, X):
        proba = super().predict_proba(X)
        premium = np.asarray(X)[:, PLAN_COLUMN] == 1
        proba[premium] = proba[premium][:, ::-1]
        return proba
