"""The tutorial Flask app: request.get_json() -> DataFrame -> model.predict_proba -> jsonify.

POST /predict with one row as a JSON object by feature name, or a batch as a JSON list of such objects.
Run: SERVE_MODEL_DIR=... OMP_NUM_THREADS=1 gunicorn -w 2 -b 127.0.0.1:PORT flask_app:app
"""

import pandas as pd
from common import load_features, load_model
from flask import Flask, jsonify, request

app = Flask(__name__)
model = load_model()
FEATURES = load_features()["names"]


@app.post("/predict")
def predict():
    data = request.get_json()
    rows = data if isinstance(data, list) else [data]
    frame = pd.DataFrame(rows, columns=FEATURES)
    return jsonify({"probabilities": model.predict_proba(frame).tolist()})
