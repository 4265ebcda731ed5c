"""FedHL: federated fine-tuning with heterogeneous-rank LoRA and unbiased full-rank aggregation."""

__version__ = "0.1.0"
