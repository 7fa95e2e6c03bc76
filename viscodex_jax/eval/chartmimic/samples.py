"""Small chart programs in the ChartMimic layout, for tests and the demo (``ChartMimic.make_sample``)."""

SAMPLE_CHARTS = {
    "bar_1": '''import matplotlib.pyplot as plt
import numpy as np

# Data
models = ["Base", "+ SFT", "+ Merge", "Ours"]
accuracy = [52.1, 61.4, 66.0, 71.3]
latency = [40.2, 41.0, 41.5, 39.8]

x = np.arange(len(models))
width = 0.38
fig, ax = plt.subplots(figsize=(6, 4))
ax.bar(x - width / 2, accuracy, width, label="Accuracy", color="#4C72B0")
ax.bar(x + width / 2, latency, width, label="Latency (ms)", color="#DD8452")
ax.set_title("Accuracy and latency by model")
ax.set_xlabel("Model")
ax.set_ylabel("Value")
ax.set_xticks(x)
ax.set_xticklabels(models)
ax.set_ylim(0, 80)
ax.legend(loc="upper left")

plt.tight_layout()
plt.savefig("bar_1.pdf", bbox_inches="tight")
''',
    "line_1": '''import matplotlib.pyplot as plt
import numpy as np

steps = np.arange(0, 11)
train = 2.5 * np.exp(-steps / 4) + 0.3
valid = 2.6 * np.exp(-steps / 5) + 0.45

plt.figure(figsize=(6, 4))
plt.plot(steps, train, marker="o", color="#2ca02c", label="train")
plt.plot(steps, valid, marker="s", linestyle="--", color="#9467bd", label="validation")
plt.title("Loss curves")
plt.xlabel("Epoch")
plt.ylabel("Loss")
plt.grid(True, alpha=0.3)
plt.legend()
plt.tight_layout()
plt.show()
''',
    "pie_1": '''import matplotlib.pyplot as plt

labels = ["Python", "HTML", "CSS", "Other"]
sizes = [45, 25, 20, 10]
colors = ["#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3"]

fig, ax = plt.subplots(figsize=(5, 5))
ax.pie(sizes, labels=labels, colors=colors, autopct="%1.0f%%", startangle=90)
ax.set_title("Share of training code")
plt.savefig("pie_1.png")
''',
    "subplots_1": '''import matplotlib.pyplot as plt
import numpy as np

rng = np.random.default_rng(0)
x = rng.normal(size=40)
y = 0.8 * x + rng.normal(scale=0.4, size=40)
t = np.linspace(0, 10, 50)

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 7))
ax1.scatter(x, y, color="#e41a1c", s=20, label="samples")
ax1.set_title("Correlation")
ax1.set_xlabel("x")
ax1.set_ylabel("y")
ax1.legend()
ax2.fill_between(t, np.sin(t) + 1.5, color="#377eb8", alpha=0.6)
ax2.plot(t, np.sin(t) + 1.5, color="#084081")
ax2.set_title("Signal")
ax2.set_xlabel("time (s)")
ax2.set_ylabel("amplitude")
fig.suptitle("Two panels")
plt.tight_layout()
plt.savefig("subplots_1.pdf")
''',
}
