"""The built-in scenario: customer churn for a telecom, a stable phase and then a real shift.

The shift is what happens when a competitor launches a cheaper offer right after a price rise:
  covariate drift: monthly charges rise ~15%, support calls and days since last login go up, the
    plan mix moves toward 'basic' and the region mix toward 'west' (a new market);
  changed relationship: price drives churn far more strongly, satisfaction far less, one-year
    contracts stop protecting, and 'west' customers churn more.
A model trained on the stable phase decays on the shifted phase; one retrained on it recovers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FEATURES_NUMERIC = ["age", "tenure_months", "monthly_charges", "total_charges", "support_calls",
                    "data_usage_gb", "num_devices", "satisfaction", "days_since_last_login"]
FEATURES_CATEGORICAL = ["contract", "plan", "region", "payment_method", "paperless_billing", "has_streaming"]
START = pd.Timestamp("2026-01-01T00:00:00Z")


def make_churn(rows: int, *, shifted: bool = False, seed: int = 0, start: pd.Timestamp = START,
               id_offset: int = 0) -> pd.DataFrame:
    """`rows` customers, one per minute from `start`, with their churn label."""
    rng = np.random.default_rng(seed)
    s = shifted
    plan = rng.choice(["basic", "standard", "premium"], rows, p=[0.55, 0.33, 0.12] if s else [0.4, 0.4, 0.2])
    base_price = np.select([plan == "basic", plan == "standard"], [30.0, 60.0], 95.0)
    monthly = base_price * (1.15 if s else 1.0) + rng.normal(0, 8, rows)
    tenure = np.clip(rng.gamma(2.0, 12.0, rows), 0, 72).round()
    contract = rng.choice(["month-to-month", "one-year", "two-year"], rows, p=[0.5, 0.3, 0.2])
    region = rng.choice(["north", "south", "east", "west"], rows,
                        p=[0.2, 0.2, 0.2, 0.4] if s else [0.3, 0.25, 0.3, 0.15])
    support = rng.poisson(2.2 if s else 1.2, rows)
    login_gap = rng.exponential(12.0 if s else 8.0, rows).round(1)
    satisfaction = np.clip(rng.normal(6.4 if s else 7.0, 1.8, rows), 1, 10).round()
    frame = pd.DataFrame({
        "customer_id": [f"C{id_offset + i:07d}" for i in range(rows)],
        "event_time": start + pd.to_timedelta(np.arange(rows), unit="min"),
        "age": np.clip(rng.normal(42, 12, rows), 18, 85).round(),
        "tenure_months": tenure,
        "monthly_charges": monthly.round(2),
        "total_charges": (monthly * np.maximum(tenure, 1) * rng.uniform(0.9, 1.1, rows)).round(2),
        "support_calls": support,
        "data_usage_gb": rng.lognormal(2.5, 0.6, rows).round(2),
        "num_devices": rng.poisson(2.0, rows) + 1,
        "satisfaction": satisfaction,
        "days_since_last_login": login_gap,
        "contract": contract,
        "plan": plan,
        "region": region,
        "payment_method": rng.choice(["card", "bank", "check", "wallet"], rows, p=[0.4, 0.25, 0.2, 0.15]),
        "paperless_billing": rng.choice(["yes", "no"], rows, p=[0.6, 0.4]),
        "has_streaming": rng.choice(["yes", "no"], rows, p=[0.45, 0.55]),
    })
    z = lambda x, mu, sd: (x - mu) / sd  # noqa: E731 - fixed stable-phase scales keep the two phases comparable
    logit = (
        -1.3
        + (0.6 if s else 1.3) * (contract == "month-to-month")
        + (0.0 if s else -0.5) * (contract == "one-year")
        - 0.9 * (contract == "two-year")
        - 0.6 * z(tenure, 24, 17)
        + (1.4 if s else 0.5) * z(monthly, 55, 25)
        + 0.45 * z(support, 1.2, 1.1)
        + 0.5 * z(login_gap, 8, 8)
        - (0.15 if s else 0.6) * z(satisfaction, 7, 1.8)
        + 0.3 * (frame["payment_method"] == "check")
        - 0.2 * (frame["has_streaming"] == "yes")
        + (0.8 if s else 0.0) * (region == "west")
    )
    frame["churned"] = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return frame
