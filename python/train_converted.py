"""A short training loop on synthetic data with a converted model.

    python python/train_converted.py [--steps 20] [--device cuda|cpu] [--amp]

The converted model keeps the original's parameters, so any optimizer, scheduler
and checkpoint code works unchanged; BatchNorm running statistics are updated by
the fused kernels exactly as nn.BatchNorm2d does. With --amp the steps run under
torch.autocast (fp16 with a GradScaler on a GPU, bf16 on a CPU), as mixed-precision
training usually does; the fused ops follow autocast like eager conv2d.
"""
import argparse

import torch
import torchvision

import mobilenet_ext


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast)")
    args = p.parse_args()
    dev = torch.device(args.device).type
    low = torch.float16 if dev == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(dev, enabled=args.amp and low == torch.float16)
    torch.manual_seed(0)

    model = mobilenet_ext.convert(torchvision.models.mobilenet_v2(num_classes=10))
    model = model.to(args.device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # a fixed synthetic batch the model can learn: labels from a random linear probe
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    for step in range(args.steps):
        with torch.autocast(dev, dtype=low, enabled=args.amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    torch.save(model.state_dict(), "/tmp/mobilenet_ext_example.pt")
    plain = torchvision.models.mobilenet_v2(num_classes=10)
    plain.load_state_dict(torch.load("/tmp/mobilenet_ext_example.pt"))
    print("checkpoint of the converted model loads into plain torchvision: ok")


if __name__ == "__main__":
    main()
