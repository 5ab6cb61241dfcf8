"""A plain FastAPI app: a pydantic model of the features (validation), DataFrame, predict_proba.

POST /predict with one row as a JSON object by feature name; POST /predict_batch with a JSON list of them.
Run: SERVE_MODEL_DIR=... OMP_NUM_THREADS=1 uvicorn fastapi_app:app --workers 2 --no-access-log
"""

import pandas as pd
from common import load_features, load_model
from fastapi import FastAPI
from pydantic import create_model

model = load_model()
_spec = load_features()
FEATURES = _spec["names"]
Customer = create_model("Customer", **{n: ({"float": float, "int": int, "str": str}[t], ...)
                                       for n, t in _spec["types"].items()})
app = FastAPI(title="churn")


# `async def`: predict_proba is short CPU-bound work that holds the GIL, so FastAPI's thread pool (what a
# plain `def` endpoint runs in) adds a hop per request and no parallelism; the 2 workers are the parallelism.
@app.post("/predict")
async def predict(customer: Customer) -> dict:
    frame = pd.DataFrame([customer.model_dump()], columns=FEATURES)
    return {"probabilities": model.predict_proba(frame).tolist()}


@app.post("/predict_batch")
async def predict_batch(customers: list[Customer]) -> dict:
    frame = pd.DataFrame([c.model_dump() for c in customers], columns=FEATURES)
    return {"probabilities": model.predict_proba(frame).tolist()}
