//! placeholder until the SVM loop lands
