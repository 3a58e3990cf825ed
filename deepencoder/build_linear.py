"""
The projector: one Linear from the fused CLIP+SAM features (2048) to the GPT width. Stored as
`projector.layers` like DeepSeek-OCR's, whose 2048 -> 1280 weights fit the d20 GPT as-is.
"""
import torch.nn as nn


class MlpProjector(nn.Module):
    def __init__(self, input_dim, n_embd):
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embd)

    def forward(self, x):
        return self.layers(x)
