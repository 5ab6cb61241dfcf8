"""Run with the mlflow venv's interpreter: save the exported pipeline as an MLflow model.

    python mlflow_export.py MODEL_DIR ROWS.json OUT_DIR

Saves the same pickled pipeline with mlflow.sklearn.save_model (the local-path form of log_model),
with a signature inferred from the sample rows and predict_proba as the pyfunc predict function, so
that the scoring server answers class probabilities like every other server in the benchmark.
"""

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ["SERVE_MODEL_DIR"] = sys.argv[1]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mlflow
    import pandas as pd
    from common import load_features, load_model
    from mlflow.models import infer_signature

    model = load_model()
    names = load_features()["names"]
    sample = pd.DataFrame(json.loads(Path(sys.argv[2]).read_text()), columns=names)
    signature = infer_signature(sample, model.predict_proba(sample))
    mlflow.sklearn.save_model(model, sys.argv[3], signature=signature, pyfunc_predict_fn="predict_proba",
                              serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_PICKLE)
    print(json.dumps({"mlflow": mlflow.__version__, "path": sys.argv[3]}))
