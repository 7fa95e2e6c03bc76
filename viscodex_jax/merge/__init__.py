"""Task-vector merging: per-tensor math, drivers over params trees and HF dirs, the config recipe."""
