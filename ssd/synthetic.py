"""``python -m ssd.synthetic --out DIR [--seed S --train N --test M]``: write the synthetic dataset."""
from ssd.data.synthetic import main

if __name__ == "__main__":
    main()
