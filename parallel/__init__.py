"""Everything that knows about ranks: context parallel attention, sequence sharding and their process groups."""
