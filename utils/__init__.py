"""Small pieces shared by the proxy (`mishards`) and the compatible node (`milvus_node`)."""
