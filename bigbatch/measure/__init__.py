"""What the studies measure about the gradient and the landscape."""
