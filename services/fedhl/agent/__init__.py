"""The client agent: speaks AgentService over gRPC (client.py) and trains LoRA locally."""
