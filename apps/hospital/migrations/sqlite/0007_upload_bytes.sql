-- Compressed uploads (issue 23): the bytes each accepted update took on
-- the network (its values in their upload encoding, SCAFFOLD's variate and
-- the sealed bytes), for the round page. NULL in rounds recorded before.
ALTER TABLE client_updates ADD COLUMN upload_bytes BIGINT;
