"""What a study measures: J* and D* (optimal_loss, posterior), per-σ losses (evaluate), the statistics and figures."""
