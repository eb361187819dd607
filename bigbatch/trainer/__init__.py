"""Everything one training run needs: data, model, optimizer, schedule, loop, checkpoints."""
