"""The small conv net the deployment and export tests share: conv -> BN -> ReLU, depthwise stride-2 conv ->
BN -> (ReLU or ReLU6), 1x1 conv, flatten, linear; batch norms with non-trivial running statistics."""
import torch
from torch import nn


def small_net(seed=0, second_activation=nn.ReLU):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), second_activation(),
        nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net
