"""Payments: provider-neutral credit purchases, refunds, plan renewals and lapses
(`purchases`), the packs file (`packs`), and one module per provider mapping its webhook
events onto those operations (`stripe_events`)."""
