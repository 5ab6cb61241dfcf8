"""A BentoML 1.4 service with adaptive batching: concurrent requests are gathered into one predict_proba.

POST /predict with {"rows": [row, ...]} (rows as JSON objects by feature name; one row or many).
Run: SERVE_MODEL_DIR=... OMP_NUM_THREADS=1 bentoml serve bentoml_service:Churn --port PORT
(2 workers, access log off: set below).

The input is a list of rows, not a `pd.DataFrame` parameter: in BentoML 1.4.40 a batchable DataFrame
parameter breaks adaptive batching (`PandasDataFrameContainer.get_batch_size` returns `batch.shape`, a
tuple, and the dispatcher fails with "TypeError: unsupported operand type(s) for +: 'int' and 'tuple'",
then answers 503 "process is overloaded"). Lists are batched by length.
"""

from typing import Any

import bentoml
import pandas as pd
from common import load_features, load_model

FEATURES = load_features()["names"]


@bentoml.service(workers=2, logging={"access": {"enabled": False}})
class Churn:
    def __init__(self) -> None:
        self.model = load_model()

    # max_batch_size: room for 16 concurrent 100-row requests in one batch (the default is 100 rows).
    @bentoml.api(batchable=True, max_batch_size=1600, max_latency_ms=10_000)
    def predict(self, rows: list[dict[str, Any]]) -> list[list[float]]:
        return self.model.predict_proba(pd.DataFrame(rows, columns=FEATURES)).tolist()
