"""A BentoML 1.4 service with adaptive batching: concurrent requests are gathered into one predict_proba.

POST /predict with {"df": [row, ...]} (a pandas DataFrame in records orient; one row or many).
Run: SERVE_MODEL_DIR=... OMP_NUM_THREADS=1 bentoml serve bentoml_service:Churn --port PORT
(2 workers, access log off: set below).
"""

import bentoml
import numpy as np
import pandas as pd

from common import load_features, load_model

FEATURES = load_features()["names"]


@bentoml.service(workers=2, logging={"access": {"enabled": False}})
class Churn:
    def __init__(self) -> None:
        self.model = load_model()

    # max_batch_size: room for 16 concurrent 100-row requests in one batch (the default is 100 rows).
    @bentoml.api(batchable=True, max_batch_size=1600, max_latency_ms=10_000)
    def predict(self, df: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(df[FEATURES])
