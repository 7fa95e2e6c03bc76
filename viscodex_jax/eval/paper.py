"""The VisCodex paper's reported results (Jiang et al., ICLR 2026, main table), for reports.

Columns: Design2Code low/high, ChartMimic low/high, MMCode pass@1, InfiBench-V, average. The keys are the
benchmarks' ``Column.key``s; which columns a report shows, and their labels, come from ``eval.registry``.
"""

PAPER_COLUMNS = ("design2code", "design2code_high", "chartmimic", "chartmimic_high", "mmcode", "infibench_v", "avg")

RESULTS = {
    "Qwen2.5-VL-7B-Instruct": (83.4, 87.6, 39.5, 38.3, 5.3, 54.0, 51.4),
    "VisCodex-8B": (90.1, 90.9, 74.8, 74.1, 11.0, 72.1, 68.8),
    "VisCodex-8B, no merge": (None, None, 73.4, 70.6, 6.8, None, None),
    "Qwen2.5-VL-72B-Instruct": (86.9, 88.7, 66.7, 68.7, 15.2, 75.2, 66.9),
    "VisCodex-33B": (90.5, 91.1, 79.3, 78.5, 15.6, 78.6, 72.3),
    "GPT-4o": (90.2, 90.4, 79.0, 83.5, 17.0, 79.9, 73.3),
}
