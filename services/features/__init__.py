"""The features service: entities, feature views, materialization, online and offline retrieval, on Feast."""
