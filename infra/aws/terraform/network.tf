# The cluster's security group. cluster.yaml names it (provider.security_group.GroupName); the launcher then uses
# it as it is instead of creating its own, which would open SSH to 0.0.0.0/0.
# Open from outside: SSH only, from var.ssh_ingress_cidrs. The dashboard (8265), GCS (6379) and the rest are
# reachable only from inside the group; reach the dashboard through an SSH tunnel (`ray dashboard cluster.yaml`).
resource "aws_security_group" "ray" {
  #checkov:skip=CKV2_AWS_5:Attached by the Ray launcher (cluster.yaml provider.security_group.GroupName), not by Terraform.
  #checkov:skip=CKV_AWS_382:Nodes pull container images and reach S3, ECR/GHCR and package indexes: egress stays open; ingress is what is restricted.
  name        = "${var.cluster_name}-ray"
  description = "Ray cluster ${var.cluster_name}: all traffic between its nodes, SSH from the operators only"
  vpc_id      = var.vpc_id

  ingress {
    description = "Ray traffic between the nodes of the cluster (GCS, object manager, raylets, dashboard)"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }

  ingress {
    description = "SSH from the operators (ray up/attach/exec, dashboard tunnel)"
    from_port   = 22
    to_port     = 22
    protocol    = "tcp"
    cidr_blocks = var.ssh_ingress_cidrs
  }

  egress {
    description = "Outbound: container registry, S3, package indexes"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}
