"""Train the scikit-learn model a peer server serves, with the peer's own interpreter and scikit-learn, and
save it in that server's format. Run by tests/peer_servers.py as `PEER_PYTHON train.py DATA OUT FORMAT`:
DATA holds X.npy and y.npy (the Adult tune rows, written by the test from patcher.datasets); FORMAT is
`mlserver` (model.joblib + model-settings.json exactly as a user writes them: no metadata, no predict_fn),
`kserve` (model.joblib) or `mlflow` (an MLflow model whose pyfunc answers predict_proba).

The model file is made here, on this machine, and read only by the peer server's own process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression


def main(data: str, out: str, fmt: str) -> int:
    X = np.load(Path(data) / "X.npy", allow_pickle=False)
    y = np.load(Path(data) / "y.npy", allow_pickle=False)
    clf = LogisticRegression(max_iter=2000).fit(X, y)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    if fmt in ("mlserver", "kserve"):
        import joblib

        joblib.dump(clf, dest / "model.joblib")
        if fmt == "mlserver":
            (dest / "model-settings.json").write_text(json.dumps({
                "name": "adult", "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "v1"}}, indent=2))
    elif fmt == "mlflow":
        import mlflow.sklearn

        # /invocations answers the pyfunc's predict, which is the estimator's predict (labels) unless told.
        mlflow.sklearn.save_model(clf, str(dest / "model"), pyfunc_predict_fn="predict_proba")
    else:
        print(f"unknown format {fmt!r}", file=sys.stderr)
        return 2
    print(json.dumps({"train_accuracy": float(clf.score(X, y))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
