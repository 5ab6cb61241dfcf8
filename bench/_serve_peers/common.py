"""What every peer app shares: the exported model and its feature list (stdlib + pickle only).

`bench/serve.py` writes into $SERVE_MODEL_DIR:
  model.pkl      the production pipeline of the everloop project, made pure scikit-learn (pickle)
  features.json  {"names": [...], "types": {"age": "float", "support_calls": "int", "plan": "str", ...}}
"""

import json
import os
import pickle
from pathlib import Path

MODEL_DIR = Path(os.environ.get("SERVE_MODEL_DIR", "."))


def load_model():
    with open(MODEL_DIR / "model.pkl", "rb") as f:
        return pickle.load(f)


def load_features() -> dict:
    return json.loads((MODEL_DIR / "features.json").read_text())
